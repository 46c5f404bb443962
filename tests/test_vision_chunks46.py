"""4.6 vision encoding in groups of crops (bounded activation memory) equals encoding them all
at once: crops are independent through the tower and both mergers."""
import numpy as np
import torch

from minicpmv.loading import load_model
from minicpmv.models import minicpmv4_6
from minicpmv.models.minicpmv4_6 import crop_groups
from test_parity46 import picture, ref_inputs


def test_crop_groups_respect_the_budget_and_keep_order():
    assert crop_groups([[2, 3], [2, 3], [2, 3]], 12) == [(2, 12), (1, 6)]
    assert crop_groups([[4, 4], [1, 1]], 10) == [(1, 16), (1, 1)]  # a crop over budget goes alone
    assert crop_groups([[1, 1]] * 5, 100) == [(5, 5)]
    assert crop_groups([], 10) == []


def test_grouped_encoding_equals_one_batch(tiny46_dir, monkeypatch):
    from transformers import AutoProcessor

    model, _ = load_model(tiny46_dir, "float32", "cpu", progress=False)
    processor = AutoProcessor.from_pretrained(tiny46_dir)
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    frames = np.stack([np.asarray(picture(120, 160, 10 + i)) for i in range(24)])
    cases = [ref_inputs(processor, image, images=[[picture(390, 1130, 1)]]),
             ref_inputs(processor, video, videos=[frames], max_slice_nums=1, use_image_id=False,
                        video_metadata=[{"fps": 6.0, "duration": 4.0, "total_num_frames": 24}])]
    with torch.no_grad():
        for inputs in cases:
            pv = inputs.get("pixel_values", inputs.get("pixel_values_videos"))
            ts = inputs.get("target_sizes", inputs.get("target_sizes_videos"))
            assert len(ts) >= 4
            whole = model.encode_vision(pv, ts)
            monkeypatch.setattr(minicpmv4_6, "VISION_CHUNK_PATCHES", int(ts[0].prod()) + 1)  # one crop per group
            assert len(crop_groups(ts.tolist(), minicpmv4_6.VISION_CHUNK_PATCHES)) == len(ts)
            grouped = model.encode_vision(pv, ts)
            monkeypatch.undo()
            assert grouped.shape == whole.shape
            assert (grouped - whole).abs().max() < 1e-5
