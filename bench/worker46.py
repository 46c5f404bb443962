"""One engine in one long-lived process, driven by bench46.py over stdin/stdout: it loads the
checkpoint once, then answers one JSON line per command, so the driver can alternate the two
engines sample by sample (A B B A) while each keeps its own peak RSS. Not meant to be run by hand.

Commands: {"run": "T1" | "T2" | "T3" | "B8", "tokens": N}, {"logits": path}, {"rss": true}.
Every sample reports `others`: the share of the machine's CPU time used by other processes
while it ran (0 = quiet, 0.5 = a whole core of two taken by someone else)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from common import cpu_jiffies, own_jiffies, peak_rss_gb

IMAGE_TOKEN, VIDEO_TOKEN = 248056, 248057
INPUT_OF = {"T1": "img448", "T2": "img1344", "T3": "video30", "B8": "text32"}


class Stamps:
    """Records a timestamp each time the engine produces a token."""

    def __init__(self):
        self.t = []

    def __call__(self, input_ids=None, scores=None):
        self.t.append(time.perf_counter())
        return scores


def hf_engine(folder, dtype):
    from transformers import LogitsProcessorList, MiniCPMV4_6ForConditionalGeneration

    model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()

    def generate(inputs: dict, n: int, batch: int = 1):
        stamps = Stamps()
        inputs = {k: (v.repeat(batch, *[1] * (v.ndim - 1)) if k in ("input_ids", "attention_mask") else v)
                  for k, v in inputs.items()}
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, logits_processor=LogitsProcessorList([stamps]))
        assert out.shape[1] - inputs["input_ids"].shape[1] == n
        return t0, stamps.t

    def first_logits(inputs):
        kw = {k: v for k, v in inputs.items() if k != "attention_mask"}
        return model(**kw, logits_to_keep=1).logits[0, -1].float()

    return generate, first_logits


def our_engine(folder, dtype):
    from minicpmv.engine.engine import Engine
    from minicpmv.engine.sampling import SamplingParams
    from minicpmv.engine.sequence import Sequence, VisionInputs
    from minicpmv.loading import load_model

    model, _ = load_model(folder, dtype, "cpu", progress=False)
    engine = Engine(model, max_context=32768, encoder_cache_bytes=0)  # every run encodes its image

    def vision_of(inputs):
        v = []
        if "pixel_values" in inputs:
            v.append(VisionInputs(IMAGE_TOKEN, inputs["pixel_values"], inputs["target_sizes"]))
        if "pixel_values_videos" in inputs:
            v.append(VisionInputs(VIDEO_TOKEN, inputs["pixel_values_videos"], inputs["target_sizes_videos"]))
        return v

    def generate(inputs: dict, n: int, batch: int = 1):
        ids = inputs["input_ids"][0].tolist()
        t0 = time.perf_counter()
        seqs = [engine.add(Sequence(list(ids), SamplingParams(max_new_tokens=n), vision_of(inputs)))
                for _ in range(batch)]
        stamps = []
        while engine.has_work():
            engine.step()
            if all(s.output_ids for s in seqs):  # from the step in which the last one got its first token
                stamps.append(time.perf_counter())
        assert all(len(s.output_ids) == n for s in seqs)
        return t0, stamps

    def first_logits(inputs):
        from minicpmv.engine.prefill import encode_with, prompt_forward, vision_features

        feats = vision_features(vision_of(inputs), encode_with(model))
        hidden, _ = prompt_forward(model, inputs["input_ids"][0], feats)
        return model.logits(hidden[0, -1]).float()

    return generate, first_logits


def sample(generate, inputs, metric: str, tokens: int) -> dict:
    busy0, total0 = cpu_jiffies()
    own0 = own_jiffies()
    batch = 8 if metric == "B8" else 1
    t0, stamps = generate(inputs[INPUT_OF[metric]], tokens, batch)
    busy1, total1 = cpu_jiffies()
    others = max(0, (busy1 - busy0) - (own_jiffies() - own0)) / max(1, total1 - total0)
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    out = {"ttft_s": stamps[0] - t0, "others": round(others, 3), "wall_s": stamps[-1] - t0}
    if steps:
        out["step_s"] = steps[len(steps) // 2]  # median time between two tokens
        out["tok_s"] = batch * len(steps) / (stamps[-1] - stamps[0])  # all sequences together
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["ours", "hf"])
    p.add_argument("--folder", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[args.dtype]
    inputs = torch.load(args.inputs)
    t = time.perf_counter()
    generate, first_logits = (hf_engine if args.engine == "hf" else our_engine)(args.folder, dtype)
    reply = {"ready": True, "load_s": time.perf_counter() - t, "rss_after_load_gb": peak_rss_gb()}
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # replies only; libraries' prints go to stderr
    sys.stdout = sys.stderr
    out.write(json.dumps(reply) + "\n")
    out.flush()
    gc.disable()
    for line in sys.stdin:
        cmd = json.loads(line)
        with torch.inference_mode():
            if "run" in cmd:
                reply = sample(generate, inputs, cmd["run"], cmd["tokens"])
            elif "logits" in cmd:
                torch.save(first_logits(inputs["img448"]), cmd["logits"])
                reply = {"saved": cmd["logits"]}
            else:
                reply = {"peak_rss_gb": peak_rss_gb()}
        gc.collect()
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
