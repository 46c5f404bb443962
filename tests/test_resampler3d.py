"""The 4.5 "3D" resampler: frames of one packing group share 64 queries, their keys carry a sine
embedding of their timestamp id. Checked against a per-unit torch.nn.MultiheadAttention oracle written
from the spec (K = ln_kv(kv_proj(x)) + pos2d + time, V = ln_kv(kv_proj(x)), frame-major keys)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv.loading import load_model
from minicpmv.models.resampler import Resampler, pos_embed_2d, temporal_embed
from minicpmv.processing.processor_v4x import ProcessorV4x

torch.set_num_threads(1)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "golden"
D, DV = 256, 32


@pytest.fixture(scope="module")
def resampler():
    torch.manual_seed(0)
    r = Resampler(64, D, DV, temporal=True).eval()
    with torch.no_grad():
        for name, p in r.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape))
            elif p.ndim == 1:  # layer-norm weights
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return r


def oracle(r: Resampler, feats: torch.Tensor, sizes, units) -> torch.Tensor:
    """One nn.MultiheadAttention call per unit over its frames' keys, concatenated frame by frame."""
    mha = torch.nn.MultiheadAttention(D, D // 128)
    with torch.no_grad():
        mha.in_proj_weight.copy_(r.attn.in_proj_weight)
        mha.in_proj_bias.copy_(r.attn.in_proj_bias)
        mha.out_proj.weight.copy_(r.attn.out_proj.weight)
        mha.out_proj.bias.copy_(r.attn.out_proj.bias)
    lengths = [h * w for h, w in sizes]
    rows = list(torch.split(feats, lengths))
    q = r.ln_q(r.query)
    out, row = [], 0
    for unit in units:
        keys, values = [], []
        for t in unit:
            h, w = sizes[row]
            x = r.ln_kv(r.kv_proj(rows[row]))
            time = temporal_embed([t], D) if t >= 0 else torch.zeros(1, D)
            keys.append(x + pos_embed_2d(h, w, D) + time)
            values.append(x)
            row += 1
        o = mha(q[:, None], torch.cat(keys)[:, None], torch.cat(values)[:, None], need_weights=False)[0][:, 0]
        out.append(r.ln_post(o) @ r.proj)
    return torch.stack(out)


def frames(n, sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(h * w for h, w in sizes[:n]), DV, generator=g)


@torch.no_grad()
def test_group_of_one_frame_is_the_image_path(resampler):
    sizes = [(5, 7), (3, 4), (6, 6)]
    x = frames(3, sizes)
    image_path = resampler(x, sizes)
    torch.testing.assert_close(resampler(x, sizes, [[-1], [-1], [-1]]), image_path, atol=1e-6, rtol=0)
    # with a timestamp, a one-frame group is the image path with the time sine added to its keys
    torch.testing.assert_close(resampler(x, sizes, [[3], [-1], [40]]), oracle(resampler, x, sizes, [[3], [-1], [40]]),
                               atol=2e-5, rtol=0)
    torch.testing.assert_close(oracle(resampler, x, sizes, [[-1]] * 3), image_path, atol=2e-5, rtol=0)


@torch.no_grad()
def test_packed_groups_match_the_oracle_with_mixed_sizes(resampler):
    # an image slice larger than the video frames in the same call: padding must stay per unit
    sizes = [(8, 9)] + [(4, 5)] * 5
    units = [[-1], [0, 5, 10], [15, 20]]
    x = frames(6, sizes)
    out = resampler(x, sizes, units)
    assert out.shape == (3, 64, D)
    torch.testing.assert_close(out, oracle(resampler, x, sizes, units), atol=2e-5, rtol=0)
    # each unit only sees its own frames: computing a group alone gives the same tokens
    alone = resampler(x[72:72 + 60], sizes[1:4], [[0, 5, 10]])
    torch.testing.assert_close(out[1:2], alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_changing_one_timestamp_changes_only_its_group(resampler):
    sizes = [(4, 4)] * 6
    x = frames(6, sizes)
    base = resampler(x, sizes, [[1, 3, 5], [7, 9, 11]])
    moved = resampler(x, sizes, [[1, 4, 5], [7, 9, 11]])
    assert (base[0] - moved[0]).abs().max() > 1e-3
    torch.testing.assert_close(base[1], moved[1], atol=0, rtol=0)
    # and the order of frames inside a group matters only through their timestamps
    swapped = torch.cat([x[16:32], x[:16], x[32:]])
    torch.testing.assert_close(resampler(swapped, sizes, [[3, 1, 5], [7, 9, 11]]), base, atol=1e-5, rtol=0)


def test_temporal_ids_must_cover_the_crops(resampler):
    sizes = [(4, 4)] * 3
    with pytest.raises(ValueError, match="cover"):
        resampler(frames(3, sizes), sizes, [[1, 2]])
    flat = Resampler(64, D, DV, temporal=False)
    with pytest.raises(ValueError, match="temporal"):
        flat(frames(3, sizes), sizes, [[1, 2, 3]])


@torch.no_grad()
def test_six_packed_448px_frames_give_64_tokens():
    folder = GOLDEN / "minicpm-v-4.5" / "model"
    model, _ = load_model(folder, "float32", "cpu", progress=False)
    processor = ProcessorV4x.from_folder(folder)
    rng = np.random.default_rng(0)
    video = [Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)) for _ in range(6)]
    prompt = "<|im_start|>user\n" + "\n".join(["(<image>./</image>)"] * 6) + "\nWhat happens?<|im_end|>\n"
    out = processor(prompt, video, max_slice_nums=1, use_image_id=False, temporal_ids=[[0, 2, 4, 6, 8, 10]])
    assert out.target_sizes.tolist() == [[32, 32]] * 6 and len(out.image_bounds) == 1
    assert out.input_ids.count(out.placeholder_id) == 64
    feats = model.encode_vision(out.pixel_values, out.target_sizes, None, temporal_ids=out.temporal_ids)
    assert feats.shape == (64, model.config.text.hidden_size)
    embeds = model.embed(torch.tensor(out.input_ids), {out.placeholder_id: feats})
    assert embeds.shape == (1, len(out.input_ids), model.config.text.hidden_size)
