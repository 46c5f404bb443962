"""Put a kernel plan into a loaded CPU model: swap the vision linears to bf16 GEMMs, and the
per-token matrices (text tower + lm_head) to the plan's 16-bit kernel or the requested weight
format. Called right after the weights load, one matrix at a time (the replaced copy is freed
before the next is built), so the peak stays at the model plus one matrix's staging copy."""
from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from ..layers import fp16_packed, fused_decode
from ..layers.mixed import MixedLinear
from ..layers.moe import Experts
from ..layers.moe_quant import QuantExperts
from ..layers.norm import GatedRMSNorm, RMSNorm, ZeroCenteredRMSNorm
from ..layers.prepacked import PrepackedBf16Linear
from ..layers.weight_formats import (Bf16Linear, Int4Linear, Int8Linear, QuantEmbedding, QuantLinear,
                                     TiedEmbedding, int4_group, swap_linears)
from . import denormals, native
from .plan import BF16, FP16_PACKED, INT4_GROUP, PREFETCH, KernelPlan


def apply_plan(model: nn.Module, plan: KernelPlan, weights: str | None, prefixes: tuple[str, ...]) -> None:
    fused_decode.invalidate()  # the modules' kernels change below: decode calls read them again
    kernels = native.quant_kernels(plan.cpu) if plan.native_kernels else None
    ops = few_row_kernels(plan, kernels)  # the AVX-512 extension, else the AVX2 module: both hold the helpers
    if ops is not None:
        ops.set_prefetch(PREFETCH[plan.prefetch][0])
    for module in model.modules():
        if plan.fused_norm and isinstance(module, (RMSNorm, ZeroCenteredRMSNorm, GatedRMSNorm)):
            module.fused = True
        if getattr(module, "native_ops", False):  # norms, the DeltaNet token and prompt, MLP activations
            module.native = ops
        if plan.flush_denormals and hasattr(module, "denormal_flush"):  # prompt chunks of DeltaNet
            module.denormal_flush = denormals.flushed
        if hasattr(module, "prompt_flash") and plan.prompt_flash and kernels is not None and kernels.bf16_dot_ok():
            module.prompt_flash = kernels  # a prompt's attention in bf16 (layers/attention.py)
    if plan.vision_bf16:  # vision matrices (everything not per-token) to bf16 GEMMs, q/k/v fused
        swap_linears(model, ("",), Bf16Linear.of, skip=prefixes,
                     accept=lambda lin: type(lin) is MixedLinear and lin.weight.dtype == torch.bfloat16)
        for name, module in model.named_modules():
            if hasattr(module, "sdpa_dtype") and not name.startswith(prefixes):
                module.sdpa_dtype = torch.bfloat16
                if plan.vision_flash and kernels is not None and kernels.bf16_dot_ok():
                    module.flash = kernels
        if plan.prepacks_vision:  # many rows a call, never a decode row: oneDNN's layout, the only copy
            for name, module in list(model.named_modules()):
                if type(module) is Bf16Linear and not name.startswith(prefixes) and module.weight.device.type == "cpu":
                    PrepackedBf16Linear.from_bf16(module)
    gptq_to_int4(model, plan, ops)
    if weights is not None:
        quantize_per_token(model, prefixes, weights, plan)
        return
    if plan.text16 == BF16:
        tied = tied_embeddings(model)
        swap_linears(model, prefixes, Bf16Linear.of, accept=lambda lin: lin.weight.dtype == torch.bfloat16)
        for name, m in list(model.named_modules()):
            if type(m) is Bf16Linear and name.startswith(prefixes):
                plain = m.weight.untyped_storage().data_ptr()
                tune_bf16(m, plan, kernels)
                if m.tiles:  # an embedding that shared the plain matrix now reads the tiles
                    for owner, attr in tied.pop(plain, []):
                        setattr(owner, attr, TiedEmbedding(m))
        if fp16_packed.available():  # what is left: an fp16 checkpoint's matrices (no bf16 copy to run)
            swap_linears(model, prefixes, fp16_packed.PackedFP16Linear,
                         accept=lambda lin: type(lin) is not Bf16Linear and fp16_packed.packable(lin))
    elif plan.text16 == FP16_PACKED and fp16_packed.available():
        fp16_packed.pack_fp16(model, prefixes)


def tune_bf16(m: Bf16Linear, plan: KernelPlan, kernels) -> None:
    """A per-token bf16 matrix's decode rows on the extension (`kernels`, if built): its FMA rows,
    or vdpbf16ps on bf16-rounded activations where the plan says so, and its AMX tiles for
    batched rows where the CPU has them."""
    if kernels is None or m.in_features % 16:
        return
    m.native = kernels
    if m.in_features % 32 == 0:
        m.bf16_dot = plan.bf16_dot and kernels.bf16_dot_ok()
        m.dot_rows = plan.bf16_dot_rows if m.bf16_dot else 0
        if m.bf16_dot and plan.bf16_tiles:
            m.weight = nn.Parameter(kernels.bf16_tile(m.weight.detach()), requires_grad=False)
            m.tiles = True
        if plan.amx_rows and kernels.amx_rows_ok() and not m.tiles:  # (the AMX rows read plain rows only)
            m.amx_rows = plan.amx_rows


def tied_embeddings(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Weight storage -> [(owner, attribute)] of the input embeddings that use it."""
    tied = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            parent, _, attr = name.rpartition(".")
            tied.setdefault(m.weight.untyped_storage().data_ptr(), []).append((model.get_submodule(parent), attr))
    return tied


def few_row_kernels(plan: KernelPlan, kernels):
    """The module whose int8_mm / int4_mm / int4_widen_t serve quantized matrices and whose decode
    helpers and fused layers serve the modules that declare `native_ops`: the AVX-512 extension
    (`kernels`) where built, else the AVX2 module where the plan says so, else None."""
    if kernels is not None or not plan.avx2_gemv:
        return kernels
    return native.avx2_kernels(plan.cpu)


def tune_format(m, fmt: str, width: int, plan: KernelPlan, kernels) -> None:
    """Set a quantized layer's kernels from the plan: the GEMM dtype of prompts, up to how many rows
    torch's kernel runs, and the extension (`kernels`, if built) for the fewest rows."""
    m.gemm_dtype, m.kernel_rows = plan.gemm_dtype, plan.kernel_rows(fmt)
    if kernels is not None and width % 16 == 0:  # the extension's int8 loop takes 16 inputs at a time
        m.native, m.native_rows = kernels, plan.module_rows(fmt)
        if fmt == "int4":  # its widening is ~25x torch's, so beyond its own rows widen + GEMM wins
            m.kernel_rows = native.ROWS


def gptq_to_int4(model: nn.Module, plan: KernelPlan, kernels) -> int:
    """Where an extension runs (`kernels`, built: its int4 kernel and widening), GPTQ int4 layers
    not yet prepared move into the int4 format (quant/gptq_int4.py) and its kernels; returns how
    many moved. Elsewhere they keep GPTQLinear's kernels (torch's int4 kernel in gptqmodel's
    arithmetic)."""
    if kernels is None:
        return 0
    from ..quant.gptq_int4 import move_to_int4

    return move_to_int4(model, lambda m: tune_format(m, "int4", m.in_features, plan, kernels))


def _half_linear(lin: nn.Linear) -> bool:
    """A loaded (not meta) floating linear that may take a weight format."""
    return (lin.weight.device.type == "cpu" and lin.weight.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and (lin.bias is None or lin.bias.device.type == "cpu") and not getattr(lin, "keep_dense", False))


def quantize_experts_while_loading(model: nn.Module, weights: str) -> int:
    """Before loading (on the meta model): replace the routed MoE experts by `QuantExperts` in
    the requested format, which round each expert's tensors as the checkpoint streams in (a MoE
    too large for memory in 16 bits never exists in 16 bits). Returns how many were replaced."""
    done = 0
    for name, m in list(model.named_modules()):
        if type(m) is Experts:
            hidden, n = m.down_proj.shape[1], m.down_proj.shape[2]
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, QuantExperts(m.num_experts, hidden, n, weights, INT4_GROUP))
            done += 1
    return done


def quantize_per_token(model: nn.Module, prefixes: tuple[str, ...], weights: str, plan: KernelPlan,
                       embeddings: bool | Collection[str] = True) -> int:
    """Replace every loaded per-token linear by its int8/int4 form (the lm_head included). An
    input embedding tied to a quantized matrix then reads that matrix (one resident copy); the
    other embeddings are stored int8 (all of them, or those named in `embeddings`: while loading,
    the ones known to be untied). Linears and embeddings still on the meta device are left for a
    later call, so the loader can call this as the checkpoint streams in."""
    tied = tied_embeddings(model)

    kernels = few_row_kernels(plan, native.quant_kernels(plan.cpu) if plan.native_kernels else None)

    def tune(m, fmt: str, width: int) -> None:
        tune_format(m, fmt, width, plan, kernels)

    def build(weight: torch.Tensor, bias, fmt: str = weights) -> QuantLinear:
        group = int4_group(weight.shape[1], INT4_GROUP) if fmt == "int4" else None
        q = Int8Linear(weight, bias) if group is None else Int4Linear(weight, bias, group)
        tune(q, q.format, q.in_features)
        return q

    def make(weight: torch.Tensor, bias):
        q = build(weight, bias)
        for owner, attr in tied.pop(weight.untyped_storage().data_ptr(), []):
            setattr(owner, attr, TiedEmbedding(q))
        return q

    for m in model.modules():
        if isinstance(m, QuantExperts):
            tune(m, m.fmt, min(k for _, k in m.shapes.values()))
    done = swap_linears(model, prefixes, make, accept=_half_linear)
    # untied input embeddings (4.7, 4.5) are stored int8 under either format, rows dequantized on
    # lookup: half their 16-bit memory; a lookup reads a few rows, so 4 bits would save memory only
    for name, m in list(model.named_modules()):
        if (isinstance(m, nn.Embedding) and name.startswith(prefixes) and m.weight.device.type == "cpu"
                and (embeddings is True or name in embeddings)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, QuantEmbedding(build(m.weight.detach(), None, "int8")))
            done += 1
    return done


def format_bytes(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Bytes of the per-token matrices as stored (what one decode step reads at batch 1)."""
    total = 0
    for name, m in model.named_modules():
        if not name.startswith(prefixes):
            continue
        if isinstance(m, (QuantLinear, QuantExperts)):
            total += m.weight_bytes()
        elif isinstance(m, fp16_packed.PackedFP16Linear):
            total += 2 * m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total
