"""MiniCPM-V 4.6 at its real size (random weights, real config.json): our engine and
transformers 5.23.0 side by side in one run, same inputs, same thread count.

Prints time to first token (448x448 image; 1344x1344 sliced; a 30-frame video with --video),
batch-1 decode tokens/s, aggregate tokens/s with 8 sequences, peak RSS, and each figure as a
ratio to transformers and as a fraction of this machine's limits measured in the same run
(fp32 GEMM rate -> compute floor; read bandwidth -> decode limit).

    python bench/bench46.py                 # ~6-8 minutes on 2 cores
    python bench/bench46.py --ours-dtype bfloat16 --video
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import REAL_46_CONFIG, gemm_gflops, median, random_checkpoint_46, read_bandwidth_gbs, run_worker

WORKER = Path(__file__).with_name("worker46.py")


def build_inputs(folder: Path, path: Path) -> dict:
    """Inputs made once with transformers' processor, so both engines get identical tensors."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    rng = np.random.RandomState(0)

    def image_inputs(side):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        img = Image.fromarray(rng.randint(0, 255, (side, side, 3)).astype("uint8"))
        return dict(proc(text=[text], images=[[img]], return_tensors="pt"))

    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    frames = rng.randint(0, 255, (30, 448, 448, 3)).astype("uint8")
    video = dict(proc(text=[text], videos=[frames], video_metadata=[{"fps": 1.0, "duration": 30.0,
                                                                     "total_num_frames": 30}],
                      max_slice_nums=1, use_image_id=False, return_tensors="pt"))
    ids = torch.tensor([[248045, 846, 198] + [int(x) for x in rng.randint(1000, 100000, 29)]])
    inputs = {"img448": image_inputs(448), "img1344": image_inputs(1344), "video30": video,
              "text32": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    torch.save(inputs, path)
    return inputs


def text_matrix_params(cfg: dict) -> int:
    """Weights of the text body's matrices (every linear of every layer, no embeddings)."""
    t, n = cfg["text_config"], 0
    Dt = t["hidden_size"]
    for kind in t["layer_types"]:
        if kind == "linear_attention":
            kd = t["linear_num_key_heads"] * t["linear_key_head_dim"]
            vd = t["linear_num_value_heads"] * t["linear_value_head_dim"]
            n += Dt * (2 * kd + vd) + Dt * vd + 2 * Dt * t["linear_num_value_heads"] + vd * Dt
        else:
            hd, H, Hkv = t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
            n += Dt * 2 * H * hd + 2 * Dt * Hkv * hd + H * hd * Dt
        n += 3 * Dt * t["intermediate_size"]
    return n


def flops_448_ttft(cfg: dict, prompt_tokens: int) -> float:
    """Matmul FLOPs of the 448x448 TTFT: vision tower (16x), mergers, text prefill, one lm_head row."""
    v, t = cfg["vision_config"], cfg["text_config"]
    D, I, L = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    k = cfg.get("insert_layer_id", 6) + 1

    def vit_layer(n):
        return 2 * n * (4 * D * D + 2 * D * I) + 4 * n * n * D

    n0 = 32 * 32
    vision = k * vit_layer(n0) + (L - k) * vit_layer(n0 // 4)
    vision += 2 * n0 * 4 * D * D + 2 * (n0 // 4) * (4 * D * 4 * I + 4 * I * D)  # window merger
    Dt = t["hidden_size"]
    vision += 2 * (n0 // 16) * (4 * D * 4 * D + 4 * D * Dt)  # final merger
    return vision + 2 * prompt_tokens * text_matrix_params(cfg) + 2 * t["vocab_size"] * Dt


def decode_bytes_per_token(cfg: dict, bytes_per_param: float) -> float:
    """Weights one decode step reads: the text body's matrices plus the (tied) lm_head."""
    t = cfg["text_config"]
    return (text_matrix_params(cfg) + t["vocab_size"] * t["hidden_size"]) * bytes_per_param


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="measured runs of the 448x448 TTFT/decode (after 1 warm-up)")
    p.add_argument("--ours-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--video", action="store_true", help="also time a 30-frame video (adds ~3 minutes)")
    p.add_argument("--skip-hf", action="store_true", help="time only our engine")
    p.add_argument("--skip-1344", action="store_true", help="skip the sliced 1344x1344 TTFT (the longest metric)")
    args = p.parse_args()

    cfg = json.loads(REAL_46_CONFIG.read_text())
    folder = random_checkpoint_46()
    work = Path(tempfile.mkdtemp(prefix="bench46-"))
    inputs = build_inputs(folder, work / "inputs.pt")
    metrics = "T1,B8" + ("" if args.skip_1344 else ",T2") + (",T3" if args.video else "")
    gflops, bw = gemm_gflops(args.threads), read_bandwidth_gbs(args.threads)
    common = ["--folder", str(folder), "--inputs", str(work / "inputs.pt"), "--threads", str(args.threads),
              "--metrics", metrics, "--runs", str(args.runs)]
    ours = run_worker(WORKER, ["ours", "--dtype", args.ours_dtype, "--logits-out", str(work / "ours.pt"), *common],
                      args.threads)
    hf = None
    if not args.skip_hf:
        hf = run_worker(WORKER, ["hf", "--dtype", "float32", "--logits-out", str(work / "hf.pt"), *common],
                        args.threads)
        a, b = torch.load(work / "ours.pt"), torch.load(work / "hf.pt")
        print(f"correctness gate (448x448 first-step logits): max|diff| {(a - b).abs().max():.2e}, "
              f"cosine {torch.nn.functional.cosine_similarity(a, b, dim=0):.6f}")

    prompt_len = inputs["img448"]["input_ids"].shape[1]
    floor_s = flops_448_ttft(cfg, prompt_len) / (gflops * 1e9)
    bytes_tok = decode_bytes_per_token(cfg, 4 if args.ours_dtype == "float32" else 2)
    limit_tok_s = bw * 1e9 / bytes_tok
    load = open("/proc/loadavg").read().split()[:3]
    print(f"\nmachine: fp32 GEMM {gflops:.0f} GFLOP/s, read bandwidth {bw:.1f} GB/s, {args.threads} threads, "
          f"load average now {' '.join(load)} (figures from a loaded machine are noisy)")
    print(f"448x448 TTFT compute floor: {floor_s:.2f} s; decode limit ({args.ours_dtype} weights, "
          f"{bytes_tok / 1e9:.2f} GB/token): {limit_tok_s:.1f} tok/s\n")
    rows = [("TTFT 448x448 (s, median)", median(ours["T1_ttft_s"]), hf and median(hf["T1_ttft_s"]), "lower"),
            ("decode batch 1 (tok/s)", 1 / ours["D1_step_s"], hf and 1 / hf["D1_step_s"], "higher"),
            ("decode 8 sequences (tok/s)", ours["B8_decode_tok_s"], hf and hf["B8_decode_tok_s"], "higher"),
            ("end-to-end 8 sequences (tok/s)", ours["B8_e2e_tok_s"], hf and hf["B8_e2e_tok_s"], "higher"),
            ("peak RSS (GB)", ours["peak_rss_gb"], hf and hf["peak_rss_gb"], "lower")]
    if not args.skip_1344:
        rows.insert(1, ("TTFT 1344x1344 sliced (s)", ours["T2_ttft_s"], hf and hf["T2_ttft_s"], "lower"))
    if args.video:
        rows.insert(2, ("TTFT 30-frame video (s)", ours["T3_ttft_s"], hf and hf["T3_ttft_s"], "lower"))
    print(f"{'metric':34s} {'ours (' + args.ours_dtype + ')':>18s} {'transformers (fp32)':>20s} {'ratio':>8s}")
    for name, a, b, better in rows:
        ratio = "" if b is None else f"{(a / b if better == 'lower' else a / b):.2f}x"
        print(f"{name:34s} {a:18.3f} {('-' if b is None else f'{b:.3f}'):>20s} {ratio:>8s}")
    print("(ratio = ours / transformers: below 1 is better for times and memory, above 1 for tok/s)")
    print(f"\nours vs limits: TTFT 448 = {median(ours['T1_ttft_s']) / floor_s:.2f}x the compute floor; "
          f"decode = {100 / ours['D1_step_s'] / limit_tok_s:.0f}% of the bandwidth limit")
    if hf:
        print(f"transformers vs limits: TTFT 448 = {median(hf['T1_ttft_s']) / floor_s:.2f}x the floor; decode = "
              f"{100 / hf['D1_step_s'] / (bw * 1e9 / decode_bytes_per_token(cfg, 4)):.0f}% of its fp32 limit")
    print("\nraw:", json.dumps({"ours": ours, "transformers": hf}))


if __name__ == "__main__":
    main()
