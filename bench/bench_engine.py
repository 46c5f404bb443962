"""Engine core v2 against the engine it replaced (commit 4c82ea0), side by side in one run, on
MiniCPM-V 4.6 at its real size (random weights, real config.json), same threads.

In-process (both engines loaded, each in its own process, samples alternated A B / B A, each
waiting for a quiet machine): aggregate decode tokens/s with 1, 8 and 32 sequences; the worst gap
between two tokens of a running stream while a 16k-token prompt is admitted; time to first token
of turn 1 and turn 2 of a 448x448 image chat; peak RSS. Through each engine's OpenAI server with
streaming clients (the same client for both): aggregate tokens/s with 1, 8 and 32 streams.

    python bench/bench_engine.py                    # ~25 minutes on 2 cores
    python bench/bench_engine.py --tiny --runs 1    # a smoke run on the tiny test checkpoint
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from common import CACHE, ROOT, median, random_checkpoint_46, wait_quiet

OLD_COMMIT = "4c82ea0"
WORKER = Path(__file__).with_name("worker_engine.py")


def old_checkout() -> Path:
    path = CACHE / f"engine-{OLD_COMMIT}"
    if not (path / "minicpmv").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), OLD_COMMIT], check=True)
    return path


def env_for(code: Path, threads: int) -> dict:
    path = os.pathsep.join([str(code), str(ROOT / "bench"), str(ROOT / "tests")])
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": path,
            "MINICPMV_BENCH_CODE": str(code)}


class Worker:
    def __init__(self, name, code, args):
        self.name = name
        cmd = [sys.executable, str(WORKER), "--folder", str(args.folder), "--threads", str(args.threads)]
        if args.kv_cache_memory and name == "v2":
            cmd += ["--kv-cache-memory", str(args.kv_cache_memory)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env_for(code, args.threads))
        self.ready = json.loads(self.proc.stdout.readline())
        print(f"{name}: {self.ready}", flush=True)

    def ask(self, cmd: dict) -> dict:
        for _ in range(3):
            wait_quiet()
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
            if reply.get("others", 0) <= 0.1:
                return reply
            print(f"  {self.name}: busy machine ({reply['others']}), again", flush=True)
        reply["noisy"] = True
        return reply

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def paired(a: Worker, b: Worker, cmd: dict, runs: int) -> list[tuple[dict, dict]]:
    out = []
    for r in range(runs):
        first, second = (a, b) if r % 2 == 0 else (b, a)
        x, y = first.ask(cmd), second.ask(cmd)
        out.append((x, y) if first is a else (y, x))
    return out


def summary(pairs, key, better="higher") -> str:
    new, old = [p[0][key] for p in pairs], [p[1][key] for p in pairs]
    ratios = [n / o if better == "higher" else o / n for n, o in zip(new, old)]
    return (f"v2 {median(new):.3g}  v1 {median(old):.3g}  v2 better by {median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f})")


# -- through the servers -------------------------------------------------------------------------

class Server:
    def __init__(self, name, code, args, port):
        self.name, self.base = name, f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "minicpmv.cli", "serve", "--model", str(args.folder), "--port", str(port),
               "--max-concurrency", "32", "--threads", str(args.threads), "--log-level", "warning",
               "--served-model-name", "m"]
        if args.kv_cache_memory and name == "v2":
            cmd += ["--kv-cache-memory", str(args.kv_cache_memory)]
        self.proc = subprocess.Popen(cmd, env=env_for(code, args.threads), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(1)
        raise RuntimeError(f"{name} server did not start")

    def streams(self, n: int, tokens: int) -> dict:
        stamps: list[list[float]] = [[] for _ in range(n)]

        def one(i):
            body = {"model": "m", "messages": [{"role": "user", "content": f"Tell me a long story, number {i}."}],
                    "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True}
            with httpx.stream("POST", self.base + "/v1/chat/completions", json=body, timeout=900) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{self.name}: HTTP {r.status_code}: {r.read()[:300]!r}")
                for line in r.iter_lines():
                    # token chunks only: the role chunk comes before the prefill, the last one after
                    if line.startswith("data: {") and _has_token(json.loads(line[6:])):
                        stamps[i].append(time.perf_counter())

        wait_quiet()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(one, range(n)))
        start = max(s[0] for s in stamps)  # every stream has its first token: all decode from here
        end = min(s[-1] for s in stamps)  # until the first one ends
        chunks = sum(sum(1 for t in s if start < t <= end) for s in stamps)
        return {"tok_s": chunks / (end - start) if end > start else float("nan")}

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def _has_token(chunk: dict) -> bool:
    return any(c.get("delta", {}).get("content") or c.get("delta", {}).get("reasoning_content")
               for c in chunk.get("choices", []))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per sample")
    p.add_argument("--server-tokens", type=int, default=128,
                   help="tokens per streaming client (the window is from the last stream's first token to the "
                        "first stream's last, so it must be long beside the prefills)")
    p.add_argument("--gap-prompt", type=int, default=16384)
    p.add_argument("--kv-cache-memory", type=int, default=4 << 30, help="v2's state pool in bytes (default 4 GiB)")
    p.add_argument("--tiny", action="store_true", help="the tiny test checkpoint (a smoke run of this script)")
    p.add_argument("--parts", default="decode,gap,turns,server",
                   help="which measurements to run (comma list of decode, gap, turns, server)")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if args.tiny:
        from tiny46 import build_tiny_46

        args.folder = build_tiny_46(CACHE / "tiny46", seed=0)
        args.gap_prompt = min(args.gap_prompt, 2000)
    else:
        args.folder = random_checkpoint_46()
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next(line for line in flags.splitlines() if line.startswith("Model name")))
    print(next(line for line in flags.splitlines() if line.startswith("Flags")))
    old = old_checkout()
    v2, v1 = Worker("v2", ROOT, args), Worker("v1", old, args)
    rows = []
    try:
        for n in (1, 8, 32) if "decode" in parts else ():
            pairs = paired(v2, v1, {"decode": n, "tokens": args.tokens}, args.runs)
            rows.append((f"decode, {n} sequences (tok/s)", summary(pairs, "tok_s")))
            print(rows[-1], flush=True)
        if "gap" in parts:
            pairs = paired(v2, v1, {"gap": args.gap_prompt, "tokens": 100000}, 1)
            new, old = pairs[0]
            rows.append((f"worst inter-token gap while a {args.gap_prompt}-token prompt is admitted (s)",
                         summary(pairs, "worst_gap_s", better="lower") +
                         f"; newcomer TTFT v2 {new['newcomer_ttft_s']:.1f}s v1 {old['newcomer_ttft_s']:.1f}s;"
                         f" v2 median gap before {new['median_gap_before_s']:.3f}s"))
            print(rows[-1], flush=True)
        if "turns" in parts:
            pairs = paired(v2, v1, {"turns": True}, args.runs)
            new = [p[0] for p in pairs]
            rows.append(("448x448 chat: turn-2 TTFT / turn-1 TTFT",
                         f"v2 {median([p['ratio'] for p in new]):.3f} ({median([p['ttft2_s'] for p in new]):.2f} s /"
                         f" {median([p['ttft1_s'] for p in new]):.2f} s, cached {new[0]['cached_tokens']} of"
                         f" {new[0]['prompt_tokens']} tokens)  v1 {median([p[1]['ratio'] for p in pairs]):.3f}"))
            print(rows[-1], flush=True)
        rss = v2.ask({"rss": True})["peak_rss_gb"], v1.ask({"rss": True})["peak_rss_gb"]
        rows.append(("peak RSS (GB)", f"v2 {rss[0]:.2f} (state pool budget {args.kv_cache_memory / 1e9:.2f})"
                                      f"  v1 {rss[1]:.2f}"))
    finally:
        v2.close()
        v1.close()
    if "server" in parts:
        servers = [Server("v2", ROOT, args, 18431), Server("v1", old, args, 18432)]
        try:
            for n in (1, 8, 32):
                res = {s.name: [] for s in servers}
                for r in range(args.runs):
                    for s in (servers if r % 2 == 0 else servers[::-1]):
                        res[s.name].append(s.streams(n, args.server_tokens)["tok_s"])
                pairs = [({"tok_s": a}, {"tok_s": b}) for a, b in zip(res["v2"], res["v1"])]
                rows.append((f"server, {n} streaming clients (tok/s)", summary(pairs, "tok_s")))
                print(rows[-1], flush=True)
        finally:
            for s in servers:
                s.close()
    print("\n| metric | result |\n|---|---|")
    for name, text in rows:
        print(f"| {name} | {text} |")


if __name__ == "__main__":
    main()
