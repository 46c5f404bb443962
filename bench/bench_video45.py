"""MiniCPM-V 4.5 video encoding at the real size: 180 frames (the model card's MAX_NUM_FRAMES) through
the SigLIP-400M tower (`vpm`) and the 3D resampler, packing 3 frames per resampler unit versus none.

Only the vision path is built (no 8B LLM), with random weights at the real 4.5 sizes (spec
v40_v45.md §1.2: vision 1152 / 4304 / 27 layers / 16 heads, patch 14, image_size 980; resampler 64
queries, D = 4096, 32 heads, kv_dim 1152; vision_batch_size 16). Frames are synthetic 16:9 images
sampled by the model card's plan (a 60 s clip at choose_fps 3 gives 180 frames; force_packing picks
the packing) and preprocessed by the real processor (max_slice_nums 1, use_image_id False).

The ViT work is the same with or without packing (every frame goes through it); packing divides the
resampler units, hence the vision tokens handed to the LLM, by 3. On a small CPU the full 180 frames
take far longer than a few minutes (about a minute per frame on 2 shared AVX2 cores), so the ViT
runs on a prefix of the frames, a few at a time, until --budget seconds are spent; the ViT features
of that prefix feed the resampler for each packing, and all times are extrapolated linearly to the
full count (the ViT is per crop, the resampler per unit); the output says when it does.
Not a test: run `python bench/bench_video45.py [--budget SECONDS] [--dtype bfloat16]`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minicpmv.models.minicpmv_v4x import MiniCPMVV4xConfig, VisionTowerV4x  # noqa: E402
from minicpmv.models.resampler import Resampler  # noqa: E402
from minicpmv.processing.processor_v4x import VIDEO_MARKER, ProcessorV4x, VideoFrames  # noqa: E402
from minicpmv.processing.video_v45 import MAX_NUM_FRAMES_V45, plan_video_v45  # noqa: E402

# the vision-side fields of openbmb/MiniCPM-V-4_5's config.json (spec §1.2; the LLM fields only set D)
REAL_45 = {"version": 4.5, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151748,
           "query_num": 64, "image_size": 448, "patch_size": 14, "vision_batch_size": 16,
           "drop_vision_last_layer": False,
           "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                             "num_attention_heads": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                             "image_size": 980, "patch_size": 14}}
# any 4.5 folder's processor slices like the real one (max_slice_nums 9, scale 448, patch 14); the
# golden's tokenizer only changes the prompt text's ids, not the crops or the unit count
PROCESSOR_FOLDER = ROOT.parent / "shared" / "fixtures" / "golden" / "minicpm-v-4.5" / "model"
CHOOSE_FPS = 3
PROMPT = f"<|im_start|>user\n{VIDEO_MARKER}\nDescribe the video.<|im_end|>\n<|im_start|>assistant\n"


def build_vision(dtype: torch.dtype, vit_layers: int | None = None):
    cfg = MiniCPMVV4xConfig.from_dict(REAL_45)
    if vit_layers:
        cfg.vision.num_hidden_layers = vit_layers
    torch.manual_seed(0)
    vpm = VisionTowerV4x(cfg.vision, cfg.vision.num_hidden_layers)
    resampler = Resampler(cfg.query_num, cfg.text.hidden_size, cfg.vision.hidden_size, temporal=True)
    with torch.no_grad():
        for module in (vpm, resampler):
            for name, p in module.named_parameters():
                if "norm" in name or name.startswith("ln_"):  # LayerNorms: identity-like
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    p.normal_(0, 0.02)
    vpm, resampler = vpm.to(dtype).eval(), resampler.to(dtype).eval()
    n = sum(p.numel() for m in (vpm, resampler) for p in m.parameters())
    return cfg, vpm, resampler, n


def synthetic_frames(count: int, width: int, height: int) -> list[Image.Image]:
    """Smoothly moving gradients with noise: real-looking sizes, content irrelevant to the timing."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        base = (x * 255 // width + 3 * i) % 256, (y * 255 // height + 5 * i) % 256, (x + y + 7 * i) % 256
        img = np.stack(base, -1).astype(np.int16) + rng.integers(-12, 12, (height, width, 3))
        frames.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
    return frames


def processed(processor, frames, groups):
    return processor(PROMPT, videos=[VideoFrames(frames, groups)], max_slice_nums=1, use_image_id=False)


@torch.inference_mode()
def run_vit(cfg, vpm, proc, dtype) -> torch.Tensor:
    return vpm(proc.pixel_values.to(dtype), proc.target_sizes, cfg.vision_batch_size)


@torch.inference_mode()
def run_resampler(resampler, feats, proc) -> torch.Tensor:
    return resampler(feats, [tuple(s) for s in proc.target_sizes.tolist()], proc.temporal_ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=MAX_NUM_FRAMES_V45, help="frames of the clip's plan (180)")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds of ViT time after which the rest is extrapolated (0 = encode every frame)")
    ap.add_argument("--packings", type=int, nargs="+", default=[3, 1])
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vit-layers", type=int, default=None, help="fewer ViT layers, for a quick smoke run only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    t = time.perf_counter()
    cfg, vpm, resampler, n_params = build_vision(dtype, args.vit_layers)
    print(f"vision path at the real 4.5 size: vpm {cfg.vision.num_hidden_layers} x {cfg.vision.hidden_size} "
          f"(mlp {cfg.vision.intermediate_size}, {cfg.vision.num_attention_heads} heads) + 3D resampler "
          f"(D {cfg.text.hidden_size}, {cfg.query_num} queries): {n_params / 1e6:.0f} M params, {args.dtype}, "
          f"random weights, built in {time.perf_counter() - t:.1f} s; {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")

    duration = args.frames / CHOOSE_FPS  # the clip whose plan picks exactly --frames frames
    total = round(duration * args.fps)
    processor = ProcessorV4x.from_folder(PROCESSOR_FOLDER)
    plans = {p: plan_video_v45(total, args.fps, choose_fps=CHOOSE_FPS, force_packing=p) for p in args.packings}
    indices = plans[args.packings[0]].frame_indices
    assert all(plan.frame_indices == indices for plan in plans.values()) and len(indices) == args.frames
    frames = synthetic_frames(args.frames, args.width, args.height)
    full = {}
    for p, plan in plans.items():
        t = time.perf_counter()
        full[p] = processed(processor, frames, plan.temporal_ids)
        full[p].seconds = time.perf_counter() - t
    # packing only regroups crops at the resampler: the ViT sees the same crops in the same order
    first = full[args.packings[0]]
    assert all(torch.equal(f.pixel_values, first.pixel_values) for f in full.values())
    h, w = first.target_sizes[0].tolist()
    print(f"clip: {duration:.0f} s of {args.width}x{args.height} at {args.fps:g} fps -> {len(indices)} frames "
          f"(choose_fps {CHOOSE_FPS}, max_slice_nums 1, use_image_id False); each frame -> one {w * 14}x{h * 14} "
          f"crop = {h * w} ViT tokens")

    # ViT: chunks of lcm(packings) frames until the time budget is spent; every packing reuses the features
    with torch.inference_mode():  # warm-up on a small crop
        run_vit(cfg, vpm, processed(processor, [frames[0].resize((112, 112))], [[0]]), dtype)
    step = int(np.lcm.reduce(args.packings))
    feats, vit_s, measured = [], 0.0, 0
    ids = [t for g in plans[args.packings[0]].temporal_ids for t in g]  # timestamps: the same for any packing
    while measured < args.frames and (args.budget <= 0 or not feats or vit_s * (1 + 1 / len(feats)) <= args.budget):
        chunk = processed(processor, frames[measured:measured + step], [[t] for t in ids[measured:measured + step]])
        t = time.perf_counter()
        feats.append(run_vit(cfg, vpm, chunk, dtype))
        vit_s += time.perf_counter() - t
        measured += len(chunk.target_sizes)
    feats = torch.cat(feats)
    scale = args.frames / measured
    if measured < args.frames:
        print(f"ViT: {vit_s:.1f} s for the first {measured} frames ({1000 * vit_s / measured:.0f} ms/frame); the full "
              f"{args.frames} frames would take ~{vit_s * scale / 60:.0f} min here, so every time below for "
              f"{args.frames} frames is EXTRAPOLATED linearly from {measured} frames (x{scale:g})")
    else:
        print(f"ViT: {vit_s:.1f} s for all {measured} frames")

    print(f"\n{'packing':>7} {'units':>6} {'vision tokens':>13} {'ViT tokens':>10} | {'ViT s':>8} {'resampler s':>11} "
          f"{'encode s':>9} {'ms/frame':>9} | {'preprocess s':>12}   ({args.frames} frames"
          f"{', extrapolated' if measured < args.frames else ''})")
    rows = {}
    for p in args.packings:
        sub = processed(processor, frames[:measured], plans[p].temporal_ids[:measured // p])
        assert torch.equal(sub.target_sizes, full[p].target_sizes[:measured])
        t = time.perf_counter()
        with torch.inference_mode():
            units = run_resampler(resampler, feats, sub)
        res_s = time.perf_counter() - t
        assert units.shape[0] == measured // p
        n_units = len(full[p].temporal_ids)
        tokens = full[p].input_ids.count(full[p].placeholder_id)
        assert tokens == n_units * cfg.query_num
        vit_tokens = int(full[p].target_sizes.prod(-1).sum())
        vit, res = vit_s * scale, res_s * scale
        rows[p] = (tokens, vit + res, vit, res)
        print(f"{p:>7} {n_units:>6} {tokens:>13} {vit_tokens:>10} | {vit:>8.1f} {res:>11.1f} {vit + res:>9.1f} "
              f"{1000 * (vit + res) / args.frames:>9.0f} | {full[p].seconds:>12.1f}")
    if 1 in rows and len(rows) > 1:
        base = rows[1]
        for p, (tokens, enc, vit, res) in rows.items():
            if p != 1:
                print(f"\npacking {p} vs none: {base[0] / tokens:.1f}x fewer vision tokens for the LLM ({tokens} vs "
                      f"{base[0]}); vision encode {enc:.0f} s vs {base[1]:.0f} s: the ViT is the same work "
                      f"({vit:.0f} s), the resampler takes {res:.1f} s vs {base[3]:.1f} s"
                      + (" [extrapolated]" if measured < args.frames else ""))


if __name__ == "__main__":
    main()
