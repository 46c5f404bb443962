"""MiniCPM-V 4.6 at its real size (random weights, real config.json): our engine and
transformers 5.23.0 side by side in one run, same inputs, same thread count.

Both engines stay loaded, each in its own process (so each peak RSS is its own), and the driver
alternates them sample by sample (A B, then B A, ...), so a neighbour's load hits both alike.
Before each sample it waits (up to 20 s) for the machine to go quiet, and a sample during which
other processes took more than 10% of the CPU is retried (at most twice) and flagged.

Prints time to first token (448x448 image; 1344x1344 sliced; a 30-frame video with --video),
batch-1 decode tokens/s, aggregate tokens/s with 8 sequences, peak RSS: per engine the median,
and the median of the paired ratios with their min-max ("within noise" when that range spans
1.0), plus each figure against this machine's limits measured in the same run (fp32 GEMM rate
-> compute floor of the 448x448 TTFT; read bandwidth -> decode limit of each weight format).

    python bench/bench46.py                 # ~8-10 minutes on 2 cores
    python bench/bench46.py --video --runs 5
    python bench/bench46.py --skip-hf --v45-int4   # adds 4.5's int4 decode (real shapes, ours only)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import (REAL_46_CONFIG, cpu_jiffies, gemm_gflops, median, random_checkpoint_46, read_bandwidth_gbs,
                    worker_env)

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


class Worker:
    """One engine in its own process (worker46.py), loaded once, answering commands."""

    def __init__(self, engine: str, dtype: str, folder: Path, inputs: Path, threads: int, log: Path):
        self.name = engine
        env = worker_env(threads)
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), engine, "--dtype", dtype, "--folder", str(folder),
                                      "--inputs", str(inputs), "--threads", str(threads)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            raise RuntimeError(f"{self.name} worker died; its log: {self.log.name}")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def wait_quiet(limit_s: float = 20.0, threshold: float = 0.15) -> float:
    """Wait until the machine's CPU use over half a second is below `threshold` (at most
    limit_s); returns the last reading."""
    end = time.monotonic() + limit_s
    while True:
        b0, t0 = cpu_jiffies()
        time.sleep(0.5)
        b1, t1 = cpu_jiffies()
        busy = (b1 - b0) / max(1, t1 - t0)
        if busy < threshold or time.monotonic() > end:
            return busy


def measure(worker: Worker, metric: str, tokens: int) -> dict:
    for attempt in range(3):
        wait_quiet()
        r = worker.ask(run=metric, tokens=tokens)
        if r["others"] <= 0.10:
            break
    r["retries"] = attempt
    return r


def paired(ours: list, hf: list, key: str, higher_is_better: bool) -> tuple[float, float, float]:
    """Median, min and max of the per-pair ratios, oriented so that > 1 means ours is better."""
    ratios = [(a[key] / b[key]) if higher_is_better else (b[key] / a[key]) for a, b in zip(ours, hf)]
    return median(ratios), min(ratios), max(ratios)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="paired rounds of the 448x448 TTFT + batch-1 decode and of "
                                                       "the 8-sequence decode (after one warm-up each)")
    p.add_argument("--ours-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = what minicpmv.load picks on a CPU: this bf16 checkpoint keeps bf16/fp16 "
                        "matrices with fp32 compute")
    p.add_argument("--decode-tokens", type=int, default=17, help="tokens per batch-1 run (16 decode steps)")
    p.add_argument("--video", action="store_true", help="also time a 30-frame video (adds ~3-5 minutes)")
    p.add_argument("--skip-hf", action="store_true", help="time only our engine")
    p.add_argument("--skip-1344", action="store_true", help="skip the sliced 1344x1344 TTFT (the longest metric)")
    p.add_argument("--v45-int4", action="store_true",
                   help="also time MiniCPM-V 4.5's language model (Qwen3-8B shapes) decoding with a GPTQ int4 body "
                        "(bench/decode45_int4.py; ours only: transformers has no 4.5; adds ~3 minutes)")
    args = p.parse_args()

    cfg = json.loads(REAL_46_CONFIG.read_text())
    folder = random_checkpoint_46()
    work = Path(tempfile.mkdtemp(prefix="bench46-"))
    inputs = build_inputs(folder, work / "inputs.pt")
    gflops, bw = gemm_gflops(args.threads), read_bandwidth_gbs(args.threads)
    started = time.monotonic()
    workers = {"ours": Worker("ours", args.ours_dtype, folder, work / "inputs.pt", args.threads, work / "ours.log")}
    if not args.skip_hf:
        workers["hf"] = Worker("hf", "float32", folder, work / "inputs.pt", args.threads, work / "hf.log")
    names = list(workers)
    res = {n: {"T1": [], "B8": []} for n in names}
    try:
        if "hf" in workers:
            for n, w in workers.items():
                w.ask(logits=str(work / f"{n}.pt"))
            a, b = torch.load(work / "ours.pt"), torch.load(work / "hf.pt")
            print(f"correctness gate (448x448 first-step logits): max|diff| {(a - b).abs().max():.2e}, "
                  f"cosine {torch.nn.functional.cosine_similarity(a, b, dim=0):.6f}", flush=True)
        for w in workers.values():  # warm-up: first-call allocations and kernel choices
            w.ask(run="T1", tokens=2)
            w.ask(run="B8", tokens=2)
        for r in range(args.runs):
            order = names if r % 2 == 0 else names[::-1]
            for metric, tokens in (("T1", args.decode_tokens), ("B8", 9)):
                for n in order:
                    res[n][metric].append(measure(workers[n], metric, tokens))
            print(f"round {r + 1}/{args.runs} done ({time.monotonic() - started:.0f} s)", flush=True)
        singles = ([] if args.skip_1344 else ["T2"]) + (["T3"] if args.video else [])
        for metric in singles:
            for n in names:
                res[n][metric] = [measure(workers[n], metric, 1)]
        for n, w in workers.items():
            res[n]["rss"] = w.ask(rss=True)["peak_rss_gb"]
            res[n]["load"] = w.info
    finally:
        for w in workers.values():
            w.close()
    report(args, cfg, inputs, res, gflops, bw, time.monotonic() - started)
    if args.v45_int4:
        from decode45_int4 import run as decode45_int4

        decode45_int4(args.threads, bw)


def report(args, cfg, inputs, res, gflops, bw, elapsed):
    ours, hf = res["ours"], res.get("hf")
    prompt_len = inputs["img448"]["input_ids"].shape[1]
    floor_s = flops_448_ttft(cfg, prompt_len) / (gflops * 1e9)
    our_bytes = decode_bytes_per_token(cfg, 4 if args.ours_dtype == "float32" else 2)
    hf_bytes = decode_bytes_per_token(cfg, 4)
    load = open("/proc/loadavg").read().split()[:3]
    print(f"\nmachine: fp32 GEMM {gflops:.0f} GFLOP/s, read bandwidth {bw:.1f} GB/s, {args.threads} threads, "
          f"load average at the end {' '.join(load)}; {elapsed:.0f} s of sampling")
    print(f"448x448 TTFT compute floor: {floor_s:.2f} s; decode limits: ours "
          f"({our_bytes / 1e9:.2f} GB/token) {bw * 1e9 / our_bytes:.1f} tok/s, transformers fp32 "
          f"({hf_bytes / 1e9:.2f} GB/token) {bw * 1e9 / hf_bytes:.1f} tok/s\n")

    def med(samples, key):
        return median([s[key] for s in samples])

    rows = [("TTFT 448x448 (s)", "T1", "ttft_s", False), ("decode batch 1 (tok/s)", "T1", None, True),
            ("decode 8 sequences (tok/s)", "B8", "tok_s", True), ("TTFT 1344x1344 sliced (s)", "T2", "ttft_s", False),
            ("TTFT 30-frame video (s)", "T3", "ttft_s", False)]
    print(f"{'metric':30s} {'ours (' + args.ours_dtype + ')':>14s} {'hf (fp32)':>10s} {'ours better by':>15s}"
          f" {'paired min-max':>15s} {'n':>3s} {'others max':>10s}")
    for label, metric, key, higher in rows:
        if metric not in ours:
            continue
        a = ours[metric]
        if key is None:  # decode tok/s from the median inter-token step of each run
            for s in a + (hf[metric] if hf else []):
                s["d1_tok_s"] = 1 / s["step_s"]
            key = "d1_tok_s"
        line = f"{label:30s} {med(a, key):14.3f}"
        others = max(s["others"] for s in a + (hf[metric] if hf else []))
        if hf:
            b = hf[metric]
            m, lo, hi = paired(a, b, key, higher)
            noise = "  within noise" if lo < 1 < hi else ""
            line += f" {med(b, key):10.3f} {m:14.2f}x {lo:7.2f}-{hi:.2f}x {len(a):3d} {others:10.2f}{noise}"
        else:
            line += f" {'-':>10s} {'':15s} {'':15s} {len(a):3d} {others:10.2f}"
        print(line)
    rss = f"{'peak RSS (GB)':30s} {ours['rss']:14.2f}"
    if hf:
        rss += f" {hf['rss']:10.2f} {hf['rss'] / ours['rss']:14.2f}x"
    print(rss)
    print("(\"ours better by\": transformers time / ours, or ours tok/s / transformers tok/s, median of the pairs;"
          " single runs for 1344x1344 and video)")
    d1 = med(ours["T1"], "d1_tok_s")
    print(f"\nours vs limits: TTFT 448 = {med(ours['T1'], 'ttft_s') / floor_s:.2f}x the compute floor; "
          f"decode batch 1 = {100 * d1 * our_bytes / (bw * 1e9):.0f}% of the bandwidth limit of its weights")
    if hf:
        d1h = med(hf["T1"], "d1_tok_s")
        print(f"transformers vs limits: TTFT 448 = {med(hf['T1'], 'ttft_s') / floor_s:.2f}x the floor; decode "
              f"batch 1 = {100 * d1h * hf_bytes / (bw * 1e9):.0f}% of its fp32 limit")
    print("\nraw:", json.dumps(res))


if __name__ == "__main__":
    main()
