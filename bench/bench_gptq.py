"""GPTQ W4A16 decode benchmark at the real MiniCPM-V 4.6 text size (Qwen3.5-0.8B body, 248k tied
vocabulary), random weights, CPU. Not a test: run it by hand (~3-5 min on 2 cores).

    python bench/bench_gptq.py [--threads 2] [--steps 24] [--no-hf] [--kernels-only]

What it measures, in one process and one run:
1. kernel table: one gate/up-shaped linear (3584x1024) at M = 1 and 64 rows: the CPU int4 kernel
   with bf16 / fp16 / fp32 activations, dense bf16 and fp32 F.linear, and per-call dequantization
   to fp32 + F.linear (the alternatives GPTQLinear chose between);
2. memory read bandwidth (torch sum over 512 MiB, best of 5) in this run;
3. decode tokens/s, batch 1, after a 16-token prompt, for our engine's text model as
   `load_model(...)` sets up a bf16 checkpoint on an x86 CPU (every per-token matrix packed for
   fbgemm's fp16 GEMM with fp32 math, layers/fp16_packed.py; fp32 activations and small tensors):
   dense, then GPTQ int4 (group 128, sym, the released recipe; values from round-to-nearest, which
   costs the same to run as GPTQ's) with the tied lm_head kept 16-bit as in the released GPTQ
   checkpoints (so it is fp16-packed too). GPTQLinear feeds the int4 kernel bf16;
4. the same decode with transformers 5.23 + optimum + gptqmodel on the same int4 tensors (if
   installed; pure bf16 model, the vision tower zero-filled since only text is decoded);
and prints, for each decode row, weight bytes read per token and the fraction of the measured
bandwidth limit that the row reaches (bytes/token x tokens/s / bandwidth), plus a row timing only
the linears of one token back to back (the weight-streaming share of a step).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT.parent / "shared" / "fixtures" / "minicpm-v-4.6"

from minicpmv.state import SingleSequence  # noqa: E402
from minicpmv.layers.fp16_packed import PackedFP16Linear, pack_fp16  # noqa: E402
from minicpmv.layers.mixed import mixed_precision_plan  # noqa: E402
from minicpmv.models.minicpmv4_6 import MiniCPMV46Config  # noqa: E402
from minicpmv.models.qwen3_5 import Qwen35TextModel  # noqa: E402
from minicpmv.quant.gptq import rtn_quantize  # noqa: E402
from minicpmv.quant.gptq_format import GPTQSpec, pack_gptq  # noqa: E402
from minicpmv.quant.gptq_linear import GPTQLinear  # noqa: E402
from minicpmv.quant.quantize_cli import DEFAULT_SEQUENTIAL_GROUPS  # noqa: E402

SPEC = GPTQSpec(bits=4, group_size=128, sym=True, desc_act=False, format="gptq")
QUANTIZED = tuple(m for g in DEFAULT_SEQUENTIAL_GROUPS for m in g)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def best_time(fn, min_time=0.3, repeats=3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_time / repeats:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best


# -- 1. kernels ---------------------------------------------------------------------------------

def kernel_table():
    N, K, gs = 3584, 1024, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
    s = torch.rand(K // gs, N, generator=g) * 0.01 + 0.001
    z = torch.full((K // gs, N), 8.0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    W = (s.repeat_interleave(gs, 0) * (q.t().float() - 8)).t().contiguous()
    codes = q.to(torch.uint8)
    sN, zN = s.t().contiguous(), z.t().contiguous()
    print(f"\n[1] one {N}x{K} linear (gate/up of the 0.8B body), ms per call, best of 3 "
          f"(threads={torch.get_num_threads()})")
    print(f"{'variant':44s} {'M=1':>9s} {'M=64':>9s}")
    table = []
    for name, make in [
        ("int4 kernel, bf16 activations", lambda M: _int4(packed, s, z, gs, M, K, torch.bfloat16)),
        ("int4 kernel, fp16 activations", lambda M: _int4(packed, s, z, gs, M, K, torch.float16)),
        ("int4 kernel, fp32 activations", lambda M: _int4(packed, s, z, gs, M, K, torch.float32)),
        ("dense bf16 F.linear", lambda M: _dense(W.bfloat16(), M, K)),
        ("dense fp32 F.linear", lambda M: _dense(W, M, K)),
        ("dequantize uint8 codes -> fp32, F.linear", lambda M: _deq(codes, sN, zN, gs, M, K)),
    ]:
        t1, t64 = best_time(make(1)) * 1e3, best_time(make(64), min_time=0.6) * 1e3
        table.append((name, t1, t64))
        print(f"{name:44s} {t1:9.3f} {t64:9.2f}", flush=True)
    return table


def _int4(packed, s, z, gs, M, K, dtype):
    x = torch.randn(M, K).to(dtype)
    sz = torch.stack([s.to(dtype), (8 - z).to(dtype) * s.to(dtype)], -1).contiguous()
    return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, gs, sz)


def _dense(W, M, K):
    x = torch.randn(M, K).to(W.dtype)
    return lambda: F.linear(x, W)


def _deq(codes, sN, zN, gs, M, K):
    x = torch.randn(M, K)
    N = codes.shape[0]

    def run():
        w = (codes.view(N, K // gs, gs).float() - zN[:, :, None]).mul_(sN[:, :, None]).view(N, K)
        return F.linear(x, w)
    return run


# -- 2. bandwidth -------------------------------------------------------------------------------

def read_bandwidth() -> float:
    a = torch.ones(128 << 20)  # 512 MiB fp32
    a.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


# -- 3. our decode ------------------------------------------------------------------------------

class TextLM(nn.Module):
    """The 4.6 language model + tied lm_head, as our engine runs it."""

    def __init__(self, cfg):
        super().__init__()
        self.language_model = Qwen35TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.language_model.embed_tokens.weight


def build_random_text_model(config: dict) -> TextLM:
    cfg = MiniCPMV46Config.from_dict(config).text
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = TextLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.language_model.embed_tokens.weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(-2, 1, generator=g))
            elif name.endswith("dt_bias"):
                p.fill_(1.0)
            elif "norm" in name:
                p.fill_(1.0 if "linear_attn.norm" in name else 0.0)
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in ** 0.5))
    return model.eval()


PER_TOKEN = ("language_model.", "lm_head")


def cpu_bf16_mode(model: TextLM) -> None:
    """What `load_model(folder, "bfloat16")` holds on a CPU before packing: bf16 matrices
    (linears, embedding, tied lm_head), every other tensor fp32, fp32 activations. `pack_fp16`
    then moves the per-token linears to fbgemm's fp16 form, as load_model does on x86."""
    half = mixed_precision_plan(model)
    for mname, module in model.named_modules():
        for key, p in module._parameters.items():
            full = f"{mname}.{key}" if mname else key
            if p is not None and p.is_floating_point() and full not in half:
                module._parameters[key] = nn.Parameter(p.float(), requires_grad=False)
    model.lm_head.weight = model.language_model.embed_tokens.weight


def quantize_body(model: TextLM) -> dict[str, dict[str, torch.Tensor]]:
    """RTN int4 g128 of every recipe linear -> our module name -> packed GPTQ tensors; the
    modules are swapped for (prepared) GPTQLinear in place."""
    packed = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("language_model.layers.") and name.endswith(QUANTIZED):
            q = rtn_quantize(module.weight.float(), SPEC)
            t = pack_gptq(q.weight, q.scales, q.zeros, q.g_idx, SPEC)
            packed[name] = t
            layer = GPTQLinear.from_tensors(t, SPEC, module.in_features, module.out_features).prepare()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
    return packed


@torch.inference_mode()
def decode(model: TextLM, prompt_len=16, steps=24) -> list[float]:
    """Greedy decode with fp32 activations; returns the seconds of each step after the prompt."""
    lm = model.language_model
    state = SingleSequence(lm.state_spec(), prompt_len + steps + 1, torch.float32)
    ids = torch.randint(0, 1000, (prompt_len,), generator=torch.Generator().manual_seed(1))
    h = lm(lm.embed_tokens(ids).float()[None], state.batch(prompt_len))
    logits = model.lm_head(h[:, -1])
    times = []
    for step in range(steps):
        t = time.perf_counter()
        tok = logits.argmax(-1)
        h = lm(lm.embed_tokens(tok).float()[None], state.batch(1))
        logits = model.lm_head(h[:, -1])
        times.append(time.perf_counter() - t)
    return times


@torch.inference_mode()
def linears_only(model: TextLM, passes=5) -> float:
    """Seconds for one token's worth of every linear (body + lm_head), back to back, fp32 rows of
    M=1 as in decode: the weight-streaming part of a step without the rest of the model."""
    mods = [m for n, m in model.named_modules() if isinstance(m, (nn.Linear, GPTQLinear, PackedFP16Linear))
            and (n.startswith("language_model.layers") or n == "lm_head")]
    xs = [torch.randn(1, m.in_features) for m in mods]
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        for m, x in zip(mods, xs):
            m(x)
        best = min(best, time.perf_counter() - t)
    return best


def weight_bytes(model: TextLM) -> int:
    """Bytes of weights one decode step reads: every matrix once (the embedding row is
    negligible; the tied lm_head reads the whole table), int4 layers as their packed runtime
    form (int4 codes + the bf16 scale/zero table)."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, PackedFP16Linear) and (name == "lm_head" or name.startswith("language_model.layers")):
            total += module.in_features * module.out_features * 2
        elif isinstance(module, GPTQLinear):
            rt = module._rt
            total += rt["packed"].numel() * rt["packed"].element_size() + rt["s"].numel() * 2 * 2
        elif name.startswith("language_model.layers") and not list(module.children()):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def state_bytes(model: TextLM) -> int:
    spec = model.language_model.state_spec()
    return sum(s.bytes_per_slot(torch.float32) for s in spec if hasattr(s, "bytes_per_slot"))


# -- 4. transformers + gptqmodel ----------------------------------------------------------------

def hf_decode(own: dict[str, torch.Tensor], packed: dict, config: dict, steps: int, prompt_len=16):
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, LogitsProcessor, LogitsProcessorList

    header = json.loads((FIXTURE / "model-safetensors-header.json").read_text())
    tensors = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        ours = key[len("model."):]
        if ours.rsplit(".", 1)[0] in packed:
            continue
        if ours in own:
            tensors[key] = own[ours].detach().to(torch.bfloat16).contiguous()
        else:  # vision tower / merger: not used when decoding text
            tensors[key] = torch.zeros(meta["shape"], dtype=torch.bfloat16)
    for module, t in packed.items():
        for part, v in t.items():
            tensors[f"model.{module}.{part}"] = v
    folder = Path(tempfile.mkdtemp(prefix="bench-gptq-"))
    try:
        cfg = dict(config)
        cfg["quantization_config"] = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                                      "quant_method": "gptq", "checkpoint_format": "gptq",
                                      "modules_in_block_to_quantize": DEFAULT_SEQUENTIAL_GROUPS}
        (folder / "config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        t0 = time.perf_counter()
        ref = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu").eval()
        load_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    kernel = type(ref.model.language_model.layers[0].mlp.gate_proj).__name__

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    ids = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, eos_token_id=None,
                     pad_token_id=0)  # warm-up (kernel repacking)
        stamp = Stamp()
        ref.generate(input_ids=ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                     eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
    return [b - a for a, b in zip(stamp.t, stamp.t[1:])], kernel, load_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--hf-steps", type=int, default=4, help="decode steps for transformers (slow: pure bf16)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers + gptqmodel")
    ap.add_argument("--kernels-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, loadavg {loadavg()}")
    kernel_table()
    if args.kernels_only:
        return
    bw = read_bandwidth()
    print(f"\n[2] memory read bandwidth (sum over 512 MiB, best of 5): {bw:.1f} GB/s", flush=True)

    config = json.loads((FIXTURE / "config.json").read_text())
    t0 = time.perf_counter()
    model = build_random_text_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n[3] random 4.6 text model: {n_params / 1e6:.0f} M parameters (tied lm_head "
          f"{model.lm_head.weight.numel() / 1e6:.0f} M) built in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    cpu_bf16_mode(model)
    dense = copy.deepcopy(model)
    pack_fp16(dense, PER_TOKEN)
    t0 = time.perf_counter()
    times = decode(dense, steps=args.steps)
    print(f"    dense decode run: {time.perf_counter() - t0:.1f} s", flush=True)
    rows.append(("ours 16-bit matrices (fbgemm fp16, fp32 math)", times, weight_bytes(dense)))
    rows.append(("  its linears alone (fp16 GEMV, M=1)", [linears_only(dense)], weight_bytes(dense)))
    del dense

    t0 = time.perf_counter()
    packed = quantize_body(model)
    print(f"    int4 g128 packing of {len(packed)} linears: {time.perf_counter() - t0:.1f} s", flush=True)
    own = {n: p.detach() for n, p in model.named_parameters()}  # the dense rest, for transformers
    pack_fp16(model, PER_TOKEN)  # what stays 16-bit (lm_head, DeltaNet in_proj_a/b), as load_model does
    b4 = weight_bytes(model)
    t0 = time.perf_counter()
    times = decode(model, steps=args.steps)
    print(f"    int4 decode run: {time.perf_counter() - t0:.1f} s", flush=True)
    rows.append(("ours GPTQ int4 body + fp16 lm_head (same mode)", times, b4))
    rows.append(("  its linears alone (int4 kernel + fp16 lm_head)", [linears_only(model)], b4))

    if not args.no_hf:
        try:
            import gptqmodel  # noqa: F401
            import optimum  # noqa: F401
        except ImportError as e:
            print(f"    transformers + gptqmodel skipped: {e}")
        else:
            times, kernel, load_s = hf_decode(own, packed, config, args.hf_steps)
            rows.append((f"transformers+gptqmodel ({kernel}), bf16", times, b4))
            print(f"    transformers loaded the int4 checkpoint in {load_s:.1f} s", flush=True)

    sb = state_bytes(model)
    print(f"\n[3/4] decode, batch 1, 16-token prompt; bandwidth limit {bw:.1f} GB/s (GatedDeltaNet state adds "
          f"{sb / 1e6:.1f} MB read+written per step, not counted)")
    print(f"{'engine / weights':52s} {'steps':>5s} {'ms/token':>9s} {'tok/s':>7s} {'MB/token':>9s} "
          f"{'limit tok/s':>11s} {'of limit':>9s}")
    base = None
    for name, times, nbytes in rows:
        if name.startswith("  ") and base is not None:
            med = statistics.median(times)
            tps, limit = 1 / med, bw * 1e9 / nbytes
            print(f"{name:52s} {'':5s} {med * 1e3:9.1f} {tps:7.2f} {nbytes / 1e6:9.0f} {limit:11.1f} {tps / limit:9.0%}")
            continue
        med = statistics.median(times)
        tps = 1 / med
        limit = bw * 1e9 / nbytes
        base = base or tps
        print(f"{name:52s} {len(times):5d} {med * 1e3:9.1f} {tps:7.2f} {nbytes / 1e6:9.0f} {limit:11.1f} "
              f"{tps / limit:9.0%}   x{tps / base:.2f} vs ours 16-bit")
    print(f"\nloadavg {loadavg()}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
