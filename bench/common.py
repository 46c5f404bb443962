"""Shared pieces of the benchmarks: random real-size checkpoints, machine probes (GEMM rate,
memory bandwidth, load), subprocess workers. Benchmarks are scripts, never timed tests."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the code under test: this checkout, or another one (bench_engine.py runs an older commit beside it)
CODE = Path(os.environ.get("MINICPMV_BENCH_CODE", ROOT))
sys.path[:0] = [str(CODE), str(ROOT / "tests")]  # the tiny-checkpoint helpers live with the tests
SHARED = ROOT.parent / "shared"
REAL_46_CONFIG = SHARED / "fixtures" / "minicpm-v-4.6" / "config.json"
CACHE = Path(os.environ.get("MINICPMV_BENCH_CACHE", Path.home() / ".cache" / "minicpmv-bench"))


def random_checkpoint_46(dtype=torch.bfloat16) -> Path:
    """A random-weight checkpoint at the real 4.6 size (transformers builds and saves it, so the
    layout is the released one), cached by config hash."""
    import shutil

    from tiny46 import FIXTURES, TOKENIZER_FILES

    text = REAL_46_CONFIG.read_text()
    key = hashlib.sha1((text + str(dtype)).encode()).hexdigest()[:12]
    folder = CACHE / f"minicpmv46-random-{key}"
    if (folder / "model.safetensors").is_file():
        return folder
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    print(f"building a random 4.6 checkpoint at the real size in {folder} (once) ...", flush=True)
    torch.manual_seed(0)
    model = MiniCPMV4_6ForConditionalGeneration(MiniCPMV4_6Config(**json.loads(text))).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURES / name, folder / name)
    return folder


def gemm_gflops(threads: int, dtype=torch.float32, m: int = 1024, k: int = 1152, n: int = 4304) -> float:
    """GEMM rate of an [m, k] x [k, n] product (default: fp32, ViT-MLP-shaped), operands made in
    `dtype` once, 3 warm-up calls, median of 7."""
    torch.set_num_threads(threads)
    a, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        torch.nn.functional.linear(a, w)
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / sorted(times)[3] / 1e9


def read_bandwidth_gbs(threads: int) -> float:
    """Sustained read bandwidth (fp32 sum over 256 MiB), median of 7."""
    torch.set_num_threads(threads)
    x = torch.ones(64 * 1024 * 1024)
    x.sum()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.nbytes / sorted(times)[3] / 1e9


def cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(v) for v in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def own_jiffies() -> int:
    """CPU time (utime + stime of every thread) this process has used, in jiffies."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_quiet(limit_s: float = 20.0, threshold: float = 0.1) -> None:
    """Wait (at most limit_s) until the machine's CPU use falls under `threshold`."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        b0, t0 = cpu_jiffies()
        time.sleep(0.5)
        b1, t1 = cpu_jiffies()
        if (b1 - b0) / max(1, t1 - t0) < threshold:
            return


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def worker_env(threads: int) -> dict:
    """The environment of a benchmark subprocess: same thread count for every library."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench"), str(ROOT / "tests"),
                                           os.environ.get("PYTHONPATH", "")])}


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
