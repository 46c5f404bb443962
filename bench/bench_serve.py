"""Serving throughput: `minicpmv serve` against `transformers serve --continuous-batching`, side
by side, on the same random MiniCPM-V 4.6 checkpoints (tiny, and real-size 0.8B layout).

For each model and server: start it on 127.0.0.1, warm it up, then for 1, 8 and 32 concurrent
clients send a fixed batch of greedy chat requests with a fixed generated length, and report
aggregate output tokens/s (completion tokens from `usage` / wall time) and median latency.
Servers run one at a time so they never share the 2 cores. Loopback only; it stops by itself.

    python bench/bench_serve.py                      # tiny + real-size, both servers
    python bench/bench_serve.py --sizes tiny --workloads text,image

Needs transformers 5.23 with its serving extras (fastapi, uvicorn), as in the test extra.
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def build_checkpoint(size: str, folder: Path) -> Path:
    """tiny: the test suite's tiny config; real: the released 4.6 config with random weights."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from tiny46 import FIXTURES, TOKENIZER_FILES, build_tiny_46

    if size == "tiny":
        return build_tiny_46(folder, seed=0)
    import shutil

    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    config = MiniCPMV4_6Config(**json.loads((FIXTURES / "config.json").read_text()))
    torch.manual_seed(0)
    model = MiniCPMV4_6ForConditionalGeneration(config).to(torch.bfloat16)  # bf16 on disk, fp32 when served
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURES / name, folder / name)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: str, model: Path, port: int, log: Path, threads: int | None) -> subprocess.Popen:
    if server == "minicpmv":
        cmd = [sys.executable, "-m", "minicpmv.cli", "serve", "--model", str(model), "--served-model-name",
               str(model), "--port", str(port), "--dtype", "float32", "--device", "cpu", "--log-level", "warning",
               "--max-concurrency", "32"]
    else:
        cmd = [str(Path(sys.executable).with_name("transformers")), "serve", str(model), "--continuous-batching",
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}  # the same for both servers
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{server} did not start; see {log}")


def request_body(server: str, model: Path, i: int, workload: str, max_tokens: int) -> dict:
    from test_server_support import image_part, photo, user

    text = f"Request {i}: write a short story about the number {i}."
    messages = user(image_part(photo(96 + i % 5 * 16, 128, i)), text) if workload == "image" else user(text)
    body = {"model": str(model), "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if server == "minicpmv":
        body["ignore_eos"] = True  # exactly max_tokens; a random model almost never stops early anyway
    return body


def one(port: int, body: dict) -> tuple[int, float, str | None]:
    start = time.monotonic()
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=1800)
        if r.status_code != 200:
            return 0, 0.0, f"HTTP {r.status_code}: {r.text[:200]}"
        return r.json()["usage"]["completion_tokens"], time.monotonic() - start, None
    except httpx.HTTPError as e:
        return 0, 0.0, repr(e)


def measure(server, model, port, clients, per_client, workload, max_tokens) -> dict:
    bodies = [request_body(server, model, i, workload, max_tokens) for i in range(clients * per_client)]
    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: one(port, b), bodies))
    wall = time.monotonic() - start
    tokens = sum(t for t, _, _ in results)
    errors = [e for _, _, e in results if e]
    latencies = [s for _, s, e in results if not e]
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "errors": len(errors),
            "load": os.getloadavg()[0],  # neighbours on a shared machine show up here
            "p50_s": statistics.median(latencies) if latencies else float("nan"), "first_error": errors[:1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,real")
    ap.add_argument("--servers", default="minicpmv,transformers")
    ap.add_argument("--workloads", default="text", help="text and/or image (one small image per request)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/minicpmv-bench"))
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both servers (default: torch's choice)")
    ap.add_argument("--real-workloads", default="text", help="workloads for the real-size model (slow on CPU)")
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    # fixed, modest generated lengths; fewer requests per client on the real-size model
    plan = {"tiny": {"max_tokens": 32, "per_client": 1}, "real": {"max_tokens": 16, "per_client": 1}}
    rows = []
    for size in args.sizes.split(","):
        model = build_checkpoint(size, args.work_dir / f"minicpmv46-{size}")
        for server in args.servers.split(","):
            port = free_port()
            log = args.work_dir / f"{server}-{size}.log"
            t0 = time.monotonic()
            proc = start(server, model, port, log, args.threads)
            startup = time.monotonic() - t0
            try:
                for workload in (args.real_workloads if size == "real" else args.workloads).split(","):
                    one(port, request_body(server, model, 999, workload, 4))  # warm-up
                    for clients in map(int, args.concurrency.split(",")):
                        r = measure(server, model, port, clients, plan[size]["per_client"], workload,
                                    plan[size]["max_tokens"])
                        rows.append((size, workload, server, clients, r, startup))
                        print(f"{size:5} {workload:5} {server:12} c={clients:<3} {r['tok_s']:8.1f} tok/s "
                              f"({r['tokens']} tokens in {r['wall_s']:.1f}s, p50 {r['p50_s']:.2f}s, "
                              f"{r['errors']} errors {r['first_error']}, load avg {r['load']:.1f})", flush=True)
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print("\n| model | workload | clients | minicpmv serve tok/s | transformers serve --continuous-batching tok/s |")
    print("|---|---|---|---|---|")
    table = {}
    for size, workload, server, clients, r, _ in rows:
        table.setdefault((size, workload, clients), {})[server] = r
    for (size, workload, clients), by_server in table.items():
        cells = [f"{by_server[s]['tok_s']:.1f}" + (f" ({by_server[s]['errors']} errors)" if by_server[s]["errors"]
                                                    else "") if s in by_server else "-"
                 for s in ("minicpmv", "transformers")]
        print(f"| {size} | {workload} | {clients} | {cells[0]} | {cells[1]} |")
    print(f"\ntorch threads: default; cores: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
