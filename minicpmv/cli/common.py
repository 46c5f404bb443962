"""What every model-running command shares: the model/device flags, the checks before loading,
and the load itself (with a progress bar and a line saying what was loaded)."""
from __future__ import annotations

import argparse
import sys
import time

from ..hub import DEFAULT_MODEL
from .errors import CliError
from .info import WEIGHT_FORMATS
from .preflight import ModelInfo, check_checkpoint_files, check_device_name, check_device_present, inspect_model

DTYPES = ["auto", "float32", "bfloat16", "float16"]


def add_model_args(p: argparse.ArgumentParser, dtype_help: str | None = None) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id or local checkpoint folder (default: {DEFAULT_MODEL}); offline: a folder made by "
                        "`minicpmv download`")
    p.add_argument("--revision", help="hub branch, tag or commit (hub ids only)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help=dtype_help or "weights dtype (auto: bfloat16 on GPUs; on CPUs the checkpoint's own, computed "
                                      "in float32)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ... (auto: cuda when available; the CPU with --weights or --isa)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--weights", choices=list(WEIGHT_FORMATS),
                   help="CPU: quantize the text matrices, MoE experts and lm_head of a 16-bit checkpoint at load "
                        "(int8 per channel, int4 per group of 64), or a GPTQ checkpoint's dense lm_head; `minicpmv "
                        "info --weights ...` shows the kernels")
    p.add_argument("--isa", help="CPU: choose kernels as for this level at most (generic, avx2, avx512, avx512_bf16, "
                                 "amx; default: what the CPU has, also $MINICPMV_CPU_ISA)")


def check_model_args(args) -> ModelInfo:
    """Torch-free checks of --model / --device (config.json read, family known, files present)."""
    check_device_name(args.device)
    weights = getattr(args, "weights", None)
    if weights and args.device.startswith("cuda"):
        raise CliError(f"--weights {weights} is a CPU format (the CPU's {weights} kernels); it does not run on "
                       f"{args.device}", "use --device cpu, or load a GPTQ checkpoint on the GPU")
    return inspect_model(args.model, getattr(args, "revision", None))


def load_model(info: ModelInfo, args, progress: bool = True, say=None, **engine_settings):
    """Device check (imports torch), download when a hub id, then the load itself. `say` gets
    the before/after lines (default: stderr when `progress`; the server passes its logger)."""
    if say is None:
        say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    check_device_present(args.device)
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    import minicpmv  # its `load` attribute (test launchers wrap it)

    from ..hub import resolve_model_path

    folder = info.folder
    if folder is None:
        from ..errors import ModelNotFoundError

        try:
            folder = resolve_model_path(info.source, getattr(args, "revision", None))
        except ModelNotFoundError as e:
            raise CliError(str(e)) from e
        check_checkpoint_files(folder)
        info.folder = folder
    weights, isa = getattr(args, "weights", None), getattr(args, "isa", None)
    if isa:
        from ..cpu.isa import detect

        try:
            detect(isa)
        except ValueError as e:
            raise CliError(f"--isa: {e}") from e
    t0 = time.perf_counter()
    fmt = f", weights {weights}" if weights else ""
    say(f"loading {info.family_name} from {folder} (dtype {args.dtype}{fmt}, device {args.device}) ...")
    model = minicpmv.load(folder, dtype=args.dtype, device=None if args.device == "auto" else args.device, progress=progress,
                          weights=weights, isa=isa, **engine_settings)
    say(f"loaded in {time.perf_counter() - t0:.1f} s ({describe_model(model)})")
    return model


def describe_model(model) -> str:
    from ..server.metrics import resident_bytes

    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in model.model.parameters() if t.is_floating_point()})
    device = next(model.model.parameters()).device
    memory = f", {resident_bytes() / 2**30:.2f} GiB resident" if device.type == "cpu" and resident_bytes() else ""
    return f"{'/'.join(dtypes)} on {device}{memory}"
