"""`minicpmv.load(...)`: resolve the checkpoint, build the right family from config.json on the
meta device, stream the weights in, and wrap everything in the chat-ready `MiniCPMV`."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .cpu import heap
from .cpu.apply import apply_plan, quantize_experts_while_loading, quantize_per_token
from .cpu.plan import check_weights, choose
from .hub import DEFAULT_MODEL, resolve_model_path
from .layers.mixed import mixed_precision_plan
from .models.registry import build_model
from .quant.apply import plan_quantized_load
from .weights import load_weights, stored_float_dtype

log = logging.getLogger("minicpmv")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def pick_device(device: str | torch.device | None, cpu_options: bool = False) -> torch.device:
    """None / "auto": a CUDA GPU when there is one, unless the load asks for CPU-only options
    (`cpu_options`: a load-time weight format or an ISA level), which choose the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not cpu_options else "cpu")
    return torch.device(device)


def pick_dtype(dtype, device: torch.device, num_params: int, stored: torch.dtype | None = None) -> torch.dtype:
    """'auto': bf16 on GPUs. On CPUs the checkpoint's own precision: a bf16/fp16 checkpoint keeps
    its matrices narrow, with the kernels the CPU runs fastest (cpu/plan.py: fp32 math on AVX2-only
    CPUs, layers/mixed.py and layers/fp16_packed.py; bf16 GEMMs where the CPU has bf16 units); an
    fp32 checkpoint stays fp32 unless the model is too big for that (> 4B parameters)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16
        if stored in (torch.bfloat16, torch.float16):
            return stored
        return torch.float32 if num_params <= 4e9 else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; got {dtype!r}")
    return _DTYPES[dtype]


def _quantize_as_loaded(model, weights: str, plan):
    """What the loader calls every GB read: quantize the linears loaded so far and give the freed
    16-bit copies back, so a 16-bit copy of the whole model never exists. Call on the meta model:
    an embedding that shares its parameter with the lm_head is tied (kept for the final pass)."""
    owners = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    untied = {name for name, m in model.named_modules()
              if isinstance(m, torch.nn.Embedding) and owners[id(m.weight)] == 1}

    def compact():
        quantize_per_token(model, model.per_token_prefixes, weights, plan, embeddings=untied)
        heap.release()
    return compact


def load_model(folder, dtype="auto", device=None, progress: bool = True, pack_per_token: bool = True,
               weights: str | None = None, isa: str | None = None):
    """Build and load just the torch model (no tokenizer); returns (model, config dict).

    On CPU the kernels come from the CPU at hand (cpu/plan.py; `isa`, e.g. "avx2", or
    $MINICPMV_CPU_ISA lowers the level the choice is made for). weights="int8" / "int4"
    quantizes the per-token matrices, the MoE experts (as they stream in) and the lm_head of a
    16-bit checkpoint at load time
    (layers/weight_formats.py); on a GPTQ checkpoint, the per-token matrices it keeps dense (the
    lm_head, DeltaNet's a/b projections). dtype="float32" is always exact fp32 arithmetic.
    pack_per_token=False keeps every matrix an nn.Linear with a `.weight` (the quantizer reads them)."""
    folder = Path(folder)
    weights = check_weights(weights)
    config = json.loads((folder / "config.json").read_text())
    device = pick_device(device, cpu_options=weights is not None or isa is not None)
    if weights is not None:
        if device.type != "cpu":
            raise ValueError(f"weights={weights!r} is a CPU format; on {device.type} load a GPTQ checkpoint instead")
        if dtype in ("float32", "fp32", torch.float32):
            raise ValueError(f"weights={weights!r} rounds the weights; it cannot be combined with dtype='float32' "
                             f"(exact fp32 arithmetic)")
        if not pack_per_token:
            raise ValueError("weights= needs pack_per_token=True")
    with torch.device("meta"):
        model = build_model(config)
    quant = plan_quantized_load(model, config, folder)  # GPTQ: swap the quantized linears (None if dense)
    if weights is not None:
        quantize_experts_while_loading(model, weights)  # MoE experts: rounded as they stream in
    num_params = sum(p.numel() for p in model.parameters())
    dtype = pick_dtype(dtype, device, num_params, stored_float_dtype(folder))
    if weights is not None and dtype == torch.float32:
        dtype = torch.bfloat16  # an fp32 checkpoint: the matrices left unquantized (vision) are kept in bf16
    keep = quant.keep_dtype() if quant else (lambda name: False)
    if device.type == "cpu" and dtype != torch.float32:
        # half-precision matrices, fp32 everything else and fp32 compute (see layers/mixed.py)
        half = mixed_precision_plan(model)

        def dtype_for(name):
            return None if keep(name) else dtype if name in half else torch.float32
    else:
        def dtype_for(name):
            return None if keep(name) else dtype
    regroup = model.checkpoint_regrouper() if hasattr(model, "checkpoint_regrouper") else None
    packs = pack_per_token and device.type == "cpu" and dtype != torch.float32
    compact = _quantize_as_loaded(model, weights, choose(isa)) if weights is not None and packs else None
    load_weights(model, folder, model.checkpoint_key, dtype_for, device, progress=progress, regroup=regroup,
                 compact=compact)
    model.tie_weights()
    if packs:
        # the kernels this CPU runs fastest, per op class (cpu/plan.py); one copy of each matrix; GPTQ
        # int4 layers move to the plan's int4 format where the extension runs
        plan = choose(isa)
        apply_plan(model, plan, weights, model.per_token_prefixes)
        model.kernel_plan, model.weight_format = plan, weights
        heap.release()
        log.info("CPU %s (%s): %s", plan.cpu.model, plan.cpu.level,
                 "; ".join(f"{k}: {v}" for k, v in plan.rows(weights, gptq=quant is not None)))
    if quant is not None:
        # float32 asked for: the GPTQ layers compute exactly as transformers + gptqmodel do in fp32
        # (fp16-rounded dequantized weights, fp32 math); otherwise the fast int4 kernels (those the
        # plan did not already move)
        quant.finish(model, "fp16_weight" if dtype == torch.float32 else "auto", isa=isa)
    if device.type == "cpu":
        log.info("heap: %s", heap.keep_warm())  # after the load, so its staging copies were unmapped
        log.info("2 MB pages: %s", heap.huge_pages())
    return model.eval(), config


def load(model: str | os.PathLike = DEFAULT_MODEL, dtype="auto", device=None, revision: str | None = None,
         progress: bool = True, weights: str | None = None, isa: str | None = None, **engine_settings):
    """Load a MiniCPM-V checkpoint (local folder or hub id) ready for `.chat(...)`. weights="int8" /
    "int4" quantizes a 16-bit checkpoint at load time (CPU); isa="avx2" forces the kernels chosen
    for AVX2-only CPUs (see minicpmv/cpu/). engine_settings: EngineConfig fields (kv_cache_memory in
    bytes, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, ...)."""
    from .chat import MiniCPMV
    from .engine.config import EngineConfig

    unknown = sorted(set(engine_settings) - (set(EngineConfig.__dataclass_fields__) - {"max_context"}))
    if unknown:
        raise TypeError(f"load() got unknown engine setting(s) {unknown}")
    folder = resolve_model_path(model, revision)
    net, config = load_model(folder, dtype, device, progress, weights=weights, isa=isa)
    return MiniCPMV.from_parts(folder, net, config, **engine_settings)
