"""MiniCPM-V 4.6 video preprocessing against transformers 5.23's video processor. transformers
decodes files only with torchcodec, so it gets our decoded frames plus the metadata, as the spec
recommends; its PyAV reader is used once to check our metadata and frames."""

import av
import numpy as np
import pytest

from minicpmv.errors import InputError
import torch

from minicpmv.processing import Video, VideoMeta, load_video
from minicpmv.processing.video_sampling import sample_frame_indices, stack_canvas
from paths import FIXTURE_46

torch.set_num_threads(1)
FIXTURE = str(FIXTURE_46)
PROMPT = "<|im_start|>user\n<|video_pad|>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n"
PIXEL_TOL = 1e-5


def write_video(path, seconds: float, fps: int = 24, width: int = 96, height: int = 64):
    """Colored gradients that drift over time plus a moving blue square (mpeg4, always in FFmpeg)."""
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(int(seconds * fps)):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 0] = (np.arange(width)[None, :] * 3 + i * 5) % 256
        frame[..., 1] = (np.arange(height)[:, None] * 4 + i * 2) % 256
        y, x = (i * 2) % (height - 8), (i * 3) % (width - 8)
        frame[y:y + 8, x:x + 8, 2] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {"small": write_video(folder / "small.mp4", 5.5),  # 132 frames, 96x64: unsliced units
            "big": write_video(folder / "big.mp4", 3.0, width=640, height=480)}  # sliced units


def oracle_run(oracle, prompt, clips, **kwargs):
    metadata = [{"fps": c.meta.fps, "duration": c.meta.duration, "total_num_frames": c.meta.total_num_frames}
                for c in clips]
    return oracle(text=[prompt], videos=[c.frames for c in clips], video_metadata=metadata, **kwargs)


def assert_same(got, ref):
    assert got.input_ids == ref["input_ids"][0].tolist()
    assert torch.equal(got.target_sizes_videos, ref["target_sizes_videos"])
    assert got.pixel_values_videos.shape == ref["pixel_values_videos"].shape
    diff = (got.pixel_values_videos - ref["pixel_values_videos"]).abs().max().item()
    assert diff <= PIXEL_TOL, diff


def test_metadata_and_frames_match_transformers_pyav_reader(videos):
    from transformers.video_utils import load_video as hf_load_video
    clip = load_video(videos["small"])
    frames, meta = hf_load_video(str(videos["small"]), backend="pyav")
    assert (clip.meta.fps, clip.meta.duration, clip.meta.total_num_frames) == (meta.fps, meta.duration, 132)
    assert np.array_equal(clip.frames, frames)


def test_frame_indices_match_oracle(oracle):
    from transformers.video_utils import VideoMetadata
    for fps in (24.0, 29.97, 1.5):
        for duration in (0.4, 3.0, 5.5, 10.2, 200.3):
            total = max(1, int(duration * fps))
            meta = VideoMeta(fps=fps, duration=total / fps, total_num_frames=total)
            hf_meta = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
            for max_num_frames in (3, 128):
                for stack in (1, 2, 3, 4):
                    main, sub = sample_frame_indices(meta, max_num_frames, stack)
                    ref = oracle.video_processor.sample_frames(hf_meta, max_num_frames=max_num_frames,
                                                              stack_frames=stack)
                    assert main + sub == list(ref), (fps, duration, max_num_frames, stack)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("hw", [(20, 30), (30, 20), (25, 25)])
def test_stack_canvas_matches_oracle(oracle, n, hw):
    frames = torch.randint(0, 256, (n, 3, *hw), dtype=torch.uint8)
    assert torch.equal(stack_canvas(frames), oracle.video_processor.concat_frames_as_image(frames)[0])


@pytest.mark.parametrize("kwargs", [
    {},
    {"stack_frames": 3},
    {"max_num_frames": 3},  # clip longer than max_num_frames seconds: uniform 10 Hz grid
    {"max_num_frames": 3, "stack_frames": 3},
    {"stack_frames": 2, "downsample_mode": "4x"},
    {"stack_frames": 5, "max_slice_nums": 1, "use_image_id": False},
], ids=str)
def test_small_clip_matches_oracle(ours, oracle, videos, kwargs):
    clip = load_video(videos["small"])
    assert_same(ours(PROMPT, videos=[clip], **kwargs), oracle_run(oracle, PROMPT, [clip], **kwargs))


@pytest.mark.parametrize("kwargs", [{}, {"stack_frames": 3, "downsample_mode": "4x"}, {"max_slice_nums": 2}], ids=str)
def test_sliced_clip_matches_oracle(ours, oracle, videos, kwargs):
    clip = load_video(videos["big"])
    got = ours(PROMPT, videos=[clip], **kwargs)
    assert_same(got, oracle_run(oracle, PROMPT, [clip], **kwargs))
    assert 248088 in got.input_ids  # 640x480 frames are sliced: <slice> markers present


def test_images_and_videos_together(ours, oracle, videos):
    clips = [load_video(videos["small"]), load_video(videos["big"])]
    image = torch.randint(0, 256, (300, 500, 3), dtype=torch.uint8).numpy()
    from PIL import Image
    image = Image.fromarray(image)
    prompt = "<|video_pad|> and <|image_pad|> then <|video_pad|>"
    got = ours(prompt, [image], clips, stack_frames=2, max_num_frames=4)
    ref = oracle_run(oracle, prompt, clips, images=[image], stack_frames=2, max_num_frames=4)
    assert_same(got, ref)
    assert torch.equal(got.pixel_values, ref["pixel_values"]) and got.num_videos == 2


def test_path_input_decodes_only_sampled_frames(ours, videos):
    full = load_video(videos["small"])
    main, sub = sample_frame_indices(full.meta, 128, 3)
    sampled = load_video(videos["small"], frame_indices=lambda meta: sample_frame_indices(meta, 128, 3)[0]
                         + sample_frame_indices(meta, 128, 3)[1])
    assert sampled.indices == sorted(set(main + sub)) and len(sampled.indices) < full.meta.total_num_frames
    assert np.array_equal(sampled.frames, full.frames[sampled.indices])
    from_path = ours(PROMPT, videos=[str(videos["small"])], stack_frames=3)
    from_clip = ours(PROMPT, videos=[full], stack_frames=3)
    assert from_path.input_ids == from_clip.input_ids
    assert torch.equal(from_path.pixel_values_videos, from_clip.pixel_values_videos)


def test_from_frames_wrapper(ours, videos):
    full = load_video(videos["small"])
    clip = Video.from_frames(full.frames, fps=24.0)
    assert clip.meta == VideoMeta(fps=24.0, duration=5.5, total_num_frames=132, width=96, height=64)
    assert ours(PROMPT, videos=[clip]).input_ids == ours(PROMPT, videos=[full]).input_ids


def test_per_request_fps_samples_main_frames_at_that_rate():
    """fps is our extension (transformers' 4.6 processor always samples 1 fps): fps=1 is the
    reference behaviour, other rates take a main frame every 1/fps seconds."""
    from minicpmv.processing.types import VideoMeta
    from minicpmv.processing.video_sampling import sample_frame_indices

    meta = VideoMeta(fps=24.0, duration=5.0, total_num_frames=120)
    assert sample_frame_indices(meta, 128, 1) == sample_frame_indices(meta, 128, 1, 1.0)
    main, sub = sample_frame_indices(meta, 128, 1, 2.0)
    assert main == [0, 12, 24, 36, 48, 60, 72, 84, 96, 108] and sub == []
    main, _ = sample_frame_indices(meta, 4, 1, 2.0)  # capped: spread uniformly
    assert len(main) == 4 and main[0] == 0 and main[-1] == 108
    assert sample_frame_indices(meta, 128, 1, 0.5)[0] == [0, 48, 96]
    with pytest.raises(InputError, match="stack_frames"):
        sample_frame_indices(meta, 128, 3, 2.0)
    with pytest.raises(InputError, match="fps must be > 0"):
        sample_frame_indices(meta, 128, 1, 0.0)
