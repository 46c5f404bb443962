"""One engine in one process: load the checkpoint, run the requested metrics on the saved
inputs, print one JSON line. Called by bench46.py; not meant to be run by hand."""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from common import peak_rss_gb

IMAGE_TOKEN, VIDEO_TOKEN = 248056, 248057


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
            stamps.append(time.perf_counter())
        assert all(len(s.output_ids) == n for s in seqs)
        # prefills run one sequence per step: the first batch-1 stamps are other sequences' prefills
        return t0, stamps[batch - 1:] if batch > 1 else stamps

    def first_logits(inputs):
        from minicpmv.engine.state import ForwardBatch, SequenceState

        ids = inputs["input_ids"][0]
        feats = {v.token_id: model.encode_vision(v.pixel_values, v.target_sizes) for v in vision_of(inputs)}
        state = SequenceState.allocate(model.state_spec(), len(ids), model.dtype, "cpu")
        hidden = model(model.embed(ids, feats), ForwardBatch([state], torch.arange(len(ids))[None]))
        return model.logits(hidden[0, -1]).float()

    return generate, first_logits


def main():
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["ours", "hf"])
    p.add_argument("--folder", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--metrics", default="T1,T2,B8")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=33)
    p.add_argument("--logits-out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    inputs = torch.load(args.inputs)
    t = time.perf_counter()
    generate, first_logits = (hf_engine if args.engine == "hf" else our_engine)(args.folder, dtype)
    result = {"engine": args.engine, "dtype": args.dtype, "load_s": time.perf_counter() - t,
              "rss_after_load_gb": peak_rss_gb()}
    gc.disable()
    with torch.inference_mode():
        if args.logits_out:
            torch.save(first_logits(inputs["img448"]), args.logits_out)
        metrics = args.metrics.split(",")
        if "T1" in metrics:  # TTFT 448x448 + batch-1 decode; the first run warms up
            ttft, steps = [], []
            for i in range(args.runs + 1):
                t0, stamps = generate(inputs["img448"], args.decode_tokens)
                if i:
                    ttft.append(stamps[0] - t0)
                    steps += [b - a for a, b in zip(stamps[1:], stamps[2:])]
            result["T1_ttft_s"] = ttft
            result["D1_step_s"] = sorted(steps)[len(steps) // 2]
        if "T2" in metrics:
            t0, stamps = generate(inputs["img1344"], 1)
            result["T2_ttft_s"] = stamps[0] - t0
        if "T3" in metrics:
            t0, stamps = generate(inputs["video30"], 1)
            result["T3_ttft_s"] = stamps[0] - t0
        if "B8" in metrics:
            n = 17
            t0, stamps = generate(inputs["text32"], n, batch=8)
            result["B8_decode_tok_s"] = 8 * (len(stamps) - 1) / (stamps[-1] - stamps[0])
            result["B8_e2e_tok_s"] = 8 * n / (stamps[-1] - t0)
    result["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
