"""MiniCPM-V 4.5's language model (Qwen3-8B shapes) decoding with a GPTQ int4 body on a CPU,
the way our loader sets up a released GPTQ checkpoint: int4 g128 linears through the CPU int4
kernel (bf16 activations inside), the untied 16-bit lm_head packed for fbgemm's fp16 GEMM, fp32
everything else. Random weights; round-to-nearest values (GPTQ's own cost the same to run).

The 36-layer body (4.9 GB in int4) is not built: decode time is linear in depth, so a step is
timed with 4 and with 2 real-shape layers and extrapolated, time(36) = t4 + 32 * (t4 - t2) / 2,
as ../shared/perf.md's protocol suggests. transformers has no 4.5 implementation to compare with,
so the figure is reported against the bandwidth limit of its own weight format.

    python bench/decode45_int4.py [--threads 2]      # ~2-3 minutes
(also run by `python bench/bench46.py --v45-int4`)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import common  # noqa: F401  (puts the repository on sys.path)
from minicpmv.state import SingleSequence
from minicpmv.layers.fp16_packed import PackedFP16Linear, pack_fp16
from minicpmv.layers.mixed import mixed_precision_plan
from minicpmv.models.llama import LlamaConfig
from minicpmv.models.qwen3 import Qwen3ForCausalLM
from minicpmv.quant.gptq import rtn_quantize
from minicpmv.quant.gptq_format import GPTQSpec, pack_gptq
from minicpmv.quant.gptq_linear import GPTQLinear

# Qwen3-8B as MiniCPM-V 4.5 ships it (spec v40_v45 1.2; vocab as MiniCPM-o 4.5's embedding)
QWEN3_8B = {"vocab_size": 151748, "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1e6, "tie_word_embeddings": False}
FULL_DEPTH = 36
SPEC = GPTQSpec(bits=4, group_size=128, sym=True, desc_act=False, format="gptq")


def build(layers: int) -> Qwen3ForCausalLM:
    cfg = LlamaConfig.from_dict({**QWEN3_8B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    half = mixed_precision_plan(model)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            for key, p in list(module._parameters.items()):
                if p is None:
                    continue
                full = f"{name}.{key}" if name else key
                if "norm" in full:
                    value = torch.ones(p.shape)
                else:
                    value = torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5
                module._parameters[key] = nn.Parameter(value.to(torch.bfloat16 if full in half else torch.float32),
                                                       requires_grad=False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):
            q = rtn_quantize(module.weight.float(), SPEC)
            layer = GPTQLinear.from_tensors(pack_gptq(q.weight, q.scales, q.zeros, q.g_idx, SPEC), SPEC,
                                            module.in_features, module.out_features).prepare()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
    pack_fp16(model, ("lm_head",))
    return model.eval()


@torch.inference_mode()
def step_time(model: Qwen3ForCausalLM, layers: int, steps: int, prompt_len: int = 16) -> float:
    """Median seconds of one decode step using the first `layers` layers."""
    body = model.model
    all_layers = body.layers
    body.layers = all_layers[:layers]
    try:
        state = SingleSequence(body.state_spec(), prompt_len + steps + 1, torch.float32)
        ids = torch.randint(0, 1000, (prompt_len,), generator=torch.Generator().manual_seed(1))
        h = body(body.embed_tokens(ids)[None], state.batch(prompt_len))
        logits = model.lm_head(h[:, -1])
        times = []
        for i in range(steps):
            t = time.perf_counter()
            tok = logits.argmax(-1)
            h = body(body.embed_tokens(tok)[None], state.batch(1))
            logits = model.lm_head(h[:, -1])
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        body.layers = all_layers


def layer_bytes(model: Qwen3ForCausalLM) -> int:
    """Weight bytes one decoder layer reads per token (int4 codes + bf16 scale/zero table)."""
    total = 0
    for module in model.model.layers[0].modules():
        if isinstance(module, GPTQLinear):
            total += module._rt["packed"].numel() * module._rt["packed"].element_size() + module._rt["s"].numel() * 4
    return total


def run(threads: int, bandwidth_gbs: float, steps: int = 8) -> None:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = build(4)
    print(f"\n[4.5 int4] Qwen3-8B shapes, 4 real layers int4 g128 + fp16-packed lm_head "
          f"({QWEN3_8B['vocab_size']}x{QWEN3_8B['hidden_size']}), built in {time.perf_counter() - t0:.0f} s", flush=True)
    step_time(model, 4, 2)  # warm-up
    t4, t2 = step_time(model, 4, steps), step_time(model, 2, steps)
    per_layer = (t4 - t2) / 2
    full = t4 + (FULL_DEPTH - 4) * per_layer
    head = model.lm_head
    assert isinstance(head, PackedFP16Linear)
    nbytes = FULL_DEPTH * layer_bytes(model) + head.in_features * head.out_features * 2
    limit = bandwidth_gbs * 1e9 / nbytes
    print(f"  step with 4 layers {t4 * 1e3:.0f} ms, with 2 layers {t2 * 1e3:.0f} ms -> {per_layer * 1e3:.1f} ms per "
          f"layer; 36 layers: {full * 1e3:.0f} ms/token = {1 / full:.2f} tok/s")
    print(f"  weights read per token {nbytes / 1e9:.2f} GB; bandwidth limit at {bandwidth_gbs:.1f} GB/s "
          f"{limit:.2f} tok/s -> {100 / full / limit:.0f}% of it (the CPU int4 kernel is compute-bound on "
          f"AVX2, ../shared/perf.md 1.3)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    run(args.threads, common.read_bandwidth_gbs(args.threads), args.steps)


if __name__ == "__main__":
    main()
