"""MiniCPM-V 4.7: the dense 1B at its real size and the 35B-A3B MoE at its real layer sizes with
fewer layers (random weights, the reconstructed configs in shared/fixtures/minicpm-v-4.7), our
engine and transformers 5.23.0 in one process, same inputs, same threads.

Prints per checkpoint: time to first token (448x448 image, canvas M-RoPE), batch-1 decode
tokens/s (median step), aggregate tokens/s of 8 sequences decoding together, and the
parameters each decoded token reads (its active parameters: the text tower's matrices it runs,
router + shared expert + top-k experts for the MoE, and the head). Decode is bound by the bytes
of weight it reads, so tokens/s x active parameters is the path's throughput; the MoE's figure
against the dense one says what the expert-grouped path costs, and dividing it by the real
35B-A3B's active parameters predicts the full model's decode speed.

    python bench/bench47.py                        # cpu, bf16 weights; the MoE with 4 layers
    python bench/bench47.py --device cuda --moe-layers 8 --runs 5
    python bench/bench47.py --tiny                 # smoke run on tiny checkpoints (timings meaningless)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import CACHE, SHARED, median, peak_rss_gb

FIXTURES = SHARED / "fixtures" / "minicpm-v-4.7"
CONFIGS = {"1B": FIXTURES / "config.1B.reconstructed.json", "35B-A3B": FIXTURES / "config.35B-A3B.reconstructed.json"}
IMAGE_TOKEN, VIDEO_TOKEN = 248056, 248057


def moe_config(layers: int) -> dict:
    """The 35B-A3B config with its first `layers` layers (keeping the 3 linear : 1 full rhythm)."""
    cfg = json.loads(CONFIGS["35B-A3B"].read_text())
    t = cfg["text_config"]
    t["num_hidden_layers"], t["layer_types"] = layers, t["layer_types"][:layers]
    return cfg


def random_checkpoint(name: str, cfg: dict, dtype=torch.bfloat16) -> Path:
    """transformers builds and saves it (the released layout: per-expert MoE tensors), cached."""
    from tiny46 import FIXTURES as FIXTURES46
    from tiny47 import TOKENIZER_FILES

    text = json.dumps(cfg, sort_keys=True)
    folder = CACHE / f"minicpmv47-{name}-{hashlib.sha1((text + str(dtype)).encode()).hexdigest()[:12]}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import MiniCPMV4_7Config, MiniCPMV4_7ForConditionalGeneration

    print(f"building random {name} in {folder} (once) ...", flush=True)
    torch.manual_seed(0)
    model = MiniCPMV4_7ForConditionalGeneration._from_config(MiniCPMV4_7Config(**cfg), dtype=dtype)
    tmp = folder.with_suffix(".tmp")
    model.save_pretrained(tmp)
    for f in TOKENIZER_FILES:
        shutil.copyfile(FIXTURES46 / f, tmp / f)
    pre = json.loads((FIXTURES46 / "preprocessor_config.json").read_text())
    (tmp / "preprocessor_config.json").write_text(json.dumps({**pre, "processor_class": "MiniCPMV4_7Processor"}))
    tmp.rename(folder)
    return folder


def active_params(cfg: dict) -> int:
    """Weights one decoded token reads in the text tower and head (embedding lookup excluded)."""
    t, n = cfg["text_config"], 0
    D = t["hidden_size"]
    moe = t.get("model_type") == "qwen3_5_moe_text"
    for kind in t.get("layer_types") or []:
        if kind == "linear_attention":
            kd = t["linear_num_key_heads"] * t["linear_key_head_dim"]
            vd = t["linear_num_value_heads"] * t["linear_value_head_dim"]
            n += D * (2 * kd + vd) + D * vd + 2 * D * t["linear_num_value_heads"] + vd * D
        else:
            hd, H, Hkv = t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
            n += D * 2 * H * hd + 2 * D * Hkv * hd + H * hd * D
        if moe:
            n += t["num_experts"] * D + D + 3 * D * t["shared_expert_intermediate_size"]
            n += t["num_experts_per_tok"] * 3 * D * t["moe_intermediate_size"]
        else:
            n += 3 * D * t["intermediate_size"]
    return n + t["vocab_size"] * D


def make_inputs(folder: Path, tiny: bool) -> dict:
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    rng = np.random.RandomState(0)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    side = 64 if tiny else 448
    img = Image.fromarray(rng.randint(0, 255, (side, side, 3)).astype("uint8"))
    ids = torch.tensor([[248045, 846, 198] + [int(x) for x in rng.randint(1000, 100000, 29)]])
    return {"image": dict(proc(text=[text], images=[[img]], return_tensors="pt")),
            "text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}


def model_bytes(model) -> tuple[int, int]:
    """(bytes of every parameter and buffer, of those inside the text tower's decoder layers)."""
    total = layers = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        n = t.numel() * t.element_size()
        total += n
        layers += n if ".layers." in name and name.startswith("language_model.") else 0
    return total, layers


def ours(folder: Path, dtype, device, weights=None, sizes=None):
    from minicpmv.engine.engine import Engine
    from minicpmv.engine.sampling import SamplingParams
    from minicpmv.engine.sequence import Sequence, VisionInputs
    from minicpmv.loading import load_model
    from minicpmv.processing.canvas_rope import CanvasMarkers, canvas_positions, token_types

    model, config = load_model(folder, dtype, device, progress=False, weights=weights)
    if sizes is not None:
        sizes["total"], sizes["layers"] = model_bytes(model)
        sizes["rss_after_load_gb"] = peak_rss_gb()
    engine = Engine(model, max_context=32768, encoder_cache_bytes=0)
    markers = CanvasMarkers.from_config(config)

    def sequence(inputs, n):
        ids = inputs["input_ids"][0].tolist()
        vision, pos, delta = [], None, 0
        if "pixel_values" in inputs:
            vision = [VisionInputs(IMAGE_TOKEN, inputs["pixel_values"], inputs["target_sizes"])]
            pos, delta = canvas_positions(ids, token_types(ids, IMAGE_TOKEN, VIDEO_TOKEN),
                                          inputs["target_sizes"].tolist(), [], 4, markers)
        return Sequence(ids, SamplingParams(max_new_tokens=n), vision, position_ids=pos, rope_delta=delta)

    def generate(inputs, n, batch=1):
        t0 = time.perf_counter()
        seqs = [engine.add(sequence(inputs, n)) for _ in range(batch)]
        stamps = []
        while engine.has_work():
            engine.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if all(s.output_ids for s in seqs):  # from the step that gave the last prompt its first token
                stamps.append(time.perf_counter())
        assert all(len(s.output_ids) == n for s in seqs)
        return t0, stamps

    return generate


def hf(folder: Path, dtype, device):
    from transformers import LogitsProcessorList, MiniCPMV4_7ForConditionalGeneration

    model = MiniCPMV4_7ForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()

    def generate(inputs, n, batch=1):
        stamps = []

        def stamp(input_ids, scores):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

        inputs = {k: (v.repeat(batch, *[1] * (v.ndim - 1)) if k in ("input_ids", "attention_mask",
                                                                       "mm_token_type_ids") else v).to(device)
                  for k, v in inputs.items()}
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
        return t0, stamps

    return generate


def measure(generate, inputs, tokens: int, runs: int) -> dict:
    ttft, step, agg = [], [], []
    for _ in range(runs):
        t0, s = generate(inputs["image"], tokens)
        ttft.append(s[0] - t0)
        step.append(median([b - a for a, b in zip(s, s[1:])]))
        _, s = generate(inputs["text"], tokens, batch=8)
        agg.append(8 * (len(s) - 1) / (s[-1] - s[0]))
    return {"ttft_s": median(ttft), "tok_s": 1 / median(step), "agg8_tok_s": median(agg)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--moe-layers", type=int, default=4, help="layers of the MoE model (the real one has 40)")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per sample")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--weights", choices=["int8", "int4"], help="ours: quantize at load (the MoE's experts too)")
    p.add_argument("--tiny", action="store_true", help="smoke run on tiny random checkpoints")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        from tiny47 import build_tiny_47

        tmp = Path(tempfile.mkdtemp(prefix="bench47-"))
        folders = {"1B": build_tiny_47(tmp / "dense", dtype=dtype),
                   "MoE": build_tiny_47(tmp / "moe", moe=True, dtype=dtype)}
    else:
        folders = {"1B": random_checkpoint("1B", json.loads(CONFIGS["1B"].read_text()), dtype),
                   "MoE": random_checkpoint(f"35B-A3B-{args.moe_layers}layers", moe_config(args.moe_layers), dtype)}
    rows = {}
    for name, folder in folders.items():
        cfg = json.loads((folder / "config.json").read_text())
        inputs = make_inputs(folder, args.tiny)
        sizes = {}
        row = {"active_params": active_params(cfg),
               "ours": measure(ours(folder, args.dtype, args.device, args.weights, sizes), inputs, args.tokens,
                               args.runs)}
        layers = cfg["text_config"]["num_hidden_layers"]
        real_layers = json.loads(CONFIGS["35B-A3B" if name == "MoE" else "1B"].read_text())["text_config"][
            "num_hidden_layers"]
        row["ours_weights_gb"] = sizes["total"] / 1e9
        row["real_size_weights_gb"] = (sizes["total"] + sizes["layers"] * (real_layers / layers - 1)) / 1e9
        row["peak_rss_after_load_gb"] = sizes["rss_after_load_gb"]
        if not args.skip_hf:
            row["hf"] = measure(hf(folder, dtype, args.device), inputs, args.tokens, args.runs)
        rows[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)

    print("\n| model | active params/token | engine | TTFT 448 img (s) | decode tok/s | 8-seq tok/s | "
          "active Gparam/s |\n|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        for engine in ("ours", "hf"):
            if engine in row:
                m = row[engine]
                print(f"| {name} | {row['active_params'] / 1e6:.1f} M | {engine} | {m['ttft_s']:.3f} | "
                      f"{m['tok_s']:.2f} | {m['agg8_tok_s']:.2f} | {m['tok_s'] * row['active_params'] / 1e9:.2f} |")
    dense, moe = rows["1B"]["ours"], rows["MoE"]["ours"]
    per_param = {k: rows[k]["ours"]["tok_s"] * rows[k]["active_params"] for k in rows}
    real = active_params(json.loads(CONFIGS["35B-A3B"].read_text()))
    print(f"\nMoE decode throughput per active parameter vs dense: {per_param['MoE'] / per_param['1B']:.2f}x")
    print(f"predicted real 35B-A3B batch-1 decode ({real / 1e9:.2f} B active params/token): "
          f"{per_param['MoE'] / real:.2f} tok/s (from the MoE), {per_param['1B'] / real:.2f} tok/s (at the dense rate)")
    for name, row in rows.items():
        print(f"{name} ({args.weights or args.dtype}): resident weights {row['ours_weights_gb']:.2f} GB, at the real "
              f"layer count {row['real_size_weights_gb']:.2f} GB; peak RSS after our load "
              f"{row['peak_rss_after_load_gb']:.2f} GB")
    print(f"peak RSS {peak_rss_gb():.2f} GB; dense 1B 8-seq/1-seq {dense['agg8_tok_s'] / dense['tok_s']:.2f}x, "
          f"MoE {moe['agg8_tok_s'] / moe['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
