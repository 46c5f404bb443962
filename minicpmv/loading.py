"""`minicpmv.load(...)`: resolve the checkpoint, build the right family from config.json on the
meta device, stream the weights in, and wrap everything in the chat-ready `MiniCPMV`."""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import torch

from .hub import DEFAULT_MODEL, resolve_model_path
from .layers import fp16_packed
from .layers.mixed import mixed_precision_plan
from .models.registry import build_model
from .quant.apply import plan_quantized_load
from .weights import load_weights, stored_float_dtype

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype, device: torch.device, num_params: int, stored: torch.dtype | None = None) -> torch.dtype:
    """'auto': bf16 on GPUs. On CPUs the checkpoint's own precision: a bf16/fp16 checkpoint keeps
    its matrices narrow and computes in fp32 (layers/mixed.py, layers/fp16_packed.py), which is
    the same math as upcasting it whole, at half the memory and up to twice the decode speed; an
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


def release_freed_memory() -> None:
    """Hand the heap pages freed while loading (replaced bf16 copies, staging buffers) back to
    the OS: glibc keeps freed chunks mapped, which shows up as ~0.3 GB of resident memory on the
    real 4.6 model. A no-op where glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_model(folder, dtype="auto", device=None, progress: bool = True, pack_per_token: bool = True):
    """Build and load just the torch model (no tokenizer); returns (model, config dict).
    pack_per_token=False keeps every matrix an nn.Linear with a `.weight` (the quantizer reads them)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    device = pick_device(device)
    with torch.device("meta"):
        model = build_model(config)
    quant = plan_quantized_load(model, config, folder)  # GPTQ: swap the quantized linears (None if dense)
    num_params = sum(p.numel() for p in model.parameters())
    dtype = pick_dtype(dtype, device, num_params, stored_float_dtype(folder))
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
    load_weights(model, folder, model.checkpoint_key, dtype_for, device, progress=progress, regroup=regroup)
    model.tie_weights()
    if quant is not None:
        # float32 asked for: the GPTQ layers compute exactly as transformers + gptqmodel do in fp32
        # (fp16-rounded dequantized weights, fp32 math); otherwise the fast int4 kernels
        quant.finish(model, "fp16_weight" if dtype == torch.float32 else "auto")
    if pack_per_token and device.type == "cpu" and dtype != torch.float32 and fp16_packed.available():
        # the per-token matrices go to fbgemm's fp16 GEMM: fp32 math at half the bytes, and the
        # fastest CPU path at every batch size measured (layers/fp16_packed.py)
        fp16_packed.pack_fp16(model, model.per_token_prefixes)
        release_freed_memory()
    return model.eval(), config


def load(model: str | os.PathLike = DEFAULT_MODEL, dtype="auto", device=None, revision: str | None = None,
         progress: bool = True, **engine_settings):
    """Load a MiniCPM-V checkpoint (local folder or hub id) ready for `.chat(...)`.
    engine_settings: EngineConfig fields (kv_cache_memory in bytes, max_num_seqs,
    max_num_batched_tokens, enable_prefix_caching, ...)."""
    from .chat import MiniCPMV
    from .engine.config import EngineConfig

    unknown = sorted(set(engine_settings) - (set(EngineConfig.__dataclass_fields__) - {"max_context"}))
    if unknown:
        raise TypeError(f"load() got unknown engine setting(s) {unknown}")
    folder = resolve_model_path(model, revision)
    net, config = load_model(folder, dtype, device, progress)
    return MiniCPMV.from_parts(folder, net, config, **engine_settings)
