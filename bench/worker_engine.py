"""One engine version in one long-lived process, driven by bench_engine.py over stdin/stdout
(one JSON line per command). The same code drives this checkout's engine and the engine of an
older commit (PYTHONPATH decides which `minicpmv` is imported): both keep the API used here,
`minicpmv.load`, `model.engine.add/step/has_work`, `Sequence(prompt_ids, SamplingParams)`.

Commands:
  {"decode": N, "tokens": T}   N sequences (distinct 32-token prompts) decode T tokens together;
                               aggregate tokens/s over the steps after every one has its first token
  {"gap": L, "tokens": T}      one stream decodes; after 4 tokens an L-token prompt arrives; the
                               stream's worst gap between two tokens until the newcomer's first token
  {"turns": true}              448x448 image chat: time to first token of turn 1 and of turn 2
  {"rss": true}                peak RSS so far
Every sample reports `others`: the CPU share other processes used while it ran."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from common import cpu_jiffies, own_jiffies, peak_rss_gb


def quietness(fn):
    busy0, total0 = cpu_jiffies()
    own0 = own_jiffies()
    out = fn()
    busy1, total1 = cpu_jiffies()
    out["others"] = round(max(0, (busy1 - busy0) - (own_jiffies() - own0)) / max(1, total1 - total0), 3)
    return out


def text_prompt(i: int, n: int) -> list[int]:
    rng = np.random.RandomState(i)
    return [248045, 846, 198] + [int(x) for x in rng.randint(1000, 100000, n - 3)]


class Bench:
    def __init__(self, model):
        from minicpmv.engine.sampling import SamplingParams
        from minicpmv.engine.sequence import Sequence

        self.model, self.engine = model, model.engine
        self.Sequence, self.SamplingParams = Sequence, SamplingParams

    def seq(self, ids, tokens):
        return self.Sequence(list(ids), self.SamplingParams(max_new_tokens=tokens))

    def decode(self, n: int, tokens: int) -> dict:
        seqs = [self.engine.add(self.seq(text_prompt(100 + i, 32), tokens)) for i in range(n)]
        start, produced = None, 0
        while self.engine.has_work():
            outs = self.engine.step()
            if start is None:
                if all(s.output_ids for s in seqs):
                    start = time.perf_counter()
                continue
            produced += sum(1 for o in outs if o.token_id is not None)
        return {"tok_s": produced / (time.perf_counter() - start), "steps_tokens": produced}

    def gap(self, length: int, tokens: int) -> dict:
        runner = self.engine.add(self.seq(text_prompt(1, 32), tokens))
        stamps, newcomer, added_at, first_at = [], None, None, None
        while self.engine.has_work():
            outs = self.engine.step()
            now = time.perf_counter()
            if any(o.seq is runner for o in outs):
                stamps.append(now)
            if newcomer is None and len(runner.output_ids) == 4:
                newcomer = self.engine.add(self.seq(text_prompt(2, length), 2))
                added_at = now
            if newcomer is not None and first_at is None and newcomer.output_ids:
                first_at = now
            if first_at is not None and len(stamps) > 4 and stamps[-1] > first_at:
                break
        for s in (runner, newcomer):
            self.engine.abort(s)
        during = [b - a for a, b in zip(stamps, stamps[1:]) if b > added_at and a < first_at]
        before = [b - a for a, b in zip(stamps, stamps[1:]) if b <= added_at]
        return {"worst_gap_s": max(during) if during else first_at - added_at,
                "median_gap_before_s": float(np.median(before)) if before else None,
                "newcomer_ttft_s": first_at - added_at, "runner_tokens_meanwhile": len(during)}

    def turns(self) -> dict:
        rng = np.random.RandomState(0)
        image = Image.fromarray(rng.randint(0, 255, (448, 448, 3)).astype("uint8"))
        for name in ("encoder_cache",):
            getattr(self.engine, name).clear()
        manager = getattr(self.engine, "manager", None)
        if manager is not None:
            manager.clear_prefix_cache()
        turn1 = [{"role": "user", "content": [image, "Describe this image."]}]
        t = time.perf_counter()
        self.model.chat(msgs=turn1, do_sample=False, max_new_tokens=1)
        ttft1 = time.perf_counter() - t
        turn2 = turn1 + [{"role": "assistant", "content": "It is a noisy square of coloured dots."},
                         {"role": "user", "content": "Which colour dominates?"}]
        t = time.perf_counter()
        reply = self.model.chat(msgs=turn2, do_sample=False, max_new_tokens=1)
        ttft2 = time.perf_counter() - t
        return {"ttft1_s": ttft1, "ttft2_s": ttft2, "ratio": ttft2 / ttft1,
                "cached_tokens": reply.usage.get("cached_tokens"), "prompt_tokens": reply.usage["prompt_tokens"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--folder", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-memory", type=int, help="bytes (engines that have a state pool)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    import minicpmv

    settings = {"kv_cache_memory": args.kv_cache_memory} if args.kv_cache_memory else {}
    t = time.perf_counter()
    model = minicpmv.load(args.folder, progress=False, **settings)
    bench = Bench(model)
    describe = getattr(model.engine, "describe", None)
    reply = {"ready": True, "load_s": time.perf_counter() - t, "rss_after_load_gb": peak_rss_gb(),
             "engine": describe() if describe else "engine v1 (per-sequence caches)",
             "minicpmv": minicpmv.__file__}
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    out.write(json.dumps(reply) + "\n")
    out.flush()
    gc.disable()
    for line in sys.stdin:
        cmd = json.loads(line)
        with torch.inference_mode():
            if "decode" in cmd:
                reply = quietness(lambda: bench.decode(cmd["decode"], cmd["tokens"]))
            elif "gap" in cmd:
                reply = quietness(lambda: bench.gap(cmd["gap"], cmd["tokens"]))
            elif "turns" in cmd:
                reply = quietness(bench.turns)
            else:
                reply = {"peak_rss_gb": peak_rss_gb()}
        gc.collect()
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
