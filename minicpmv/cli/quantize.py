"""`minicpmv quantize`: the command line of GPTQ quantization (quant/quantize_cli.py does the work).
Every check of the input (dense source, free output folder, calibration data) runs first."""
from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CliError
from .preflight import check_range, inspect_model

EPILOG = """examples:
  minicpmv quantize --model ./MiniCPM-V-4.6 --out ./MiniCPM-V-4.6-int4
  minicpmv quantize --model ./MiniCPM-V-4.6 --out ./MiniCPM-V-4.6-int4 --calibration ./calib --num-samples 128

Only the LLM's decoder-layer linears are quantized; the vision tower, resampler/merger, embeddings,
norms and lm_head are copied. The output loads in minicpmv, transformers (+ optimum + gptqmodel)
and vLLM."""


def add_quantize_parser(sub, parents) -> None:
    p = sub.add_parser("quantize", parents=parents, help="GPTQ-quantize a checkpoint's LLM linears (W4A16 by default)",
                       description="GPTQ-quantize a dense MiniCPM-V checkpoint into a new folder.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="dense checkpoint: local folder (config.json, *.safetensors, tokenizer) or hub id")
    p.add_argument("--out", required=True, type=Path, help="output folder for the quantized checkpoint (must not "
                                                           "exist unless --force)")
    p.add_argument("--force", action="store_true", help="write into --out even if it exists (its weights are replaced)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 4, 8], help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, default=128,
                   help="inputs per scale/zero group; -1 = per column (default 128)")
    p.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by decreasing Hessian diagonal")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with a zero point per group")
    p.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2"],
                   help="checkpoint format: gptq (v1, zero-1, widest support; default) or gptq_v2")
    p.add_argument("--damp-percent", type=float, default=0.01,
                   help="Hessian damping, fraction of the mean diagonal (default 0.01)")
    p.add_argument("--static-groups", action="store_true", help="fix group scales before the column sweep")
    p.add_argument("--calibration", type=Path, help="calibration data: .jsonl/.json/.txt file or a folder of images "
                                                    "and texts (default: a small built-in text+image set)")
    p.add_argument("--num-samples", type=int, default=128, help="most calibration samples (default 128)")
    p.add_argument("--max-tokens", type=int, default=512, help="text samples are cut to this many tokens (default 512)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="how the dense model is held while calibrating (auto: the checkpoint's own, fp32 compute)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_quantize)


def check_quantize_args(args):
    check_range("--group-size", args.group_size, -1)
    if args.group_size == 0:
        raise CliError("--group-size 0 is not a group size", "use -1 (per column) or e.g. 128")
    check_range("--damp-percent", args.damp_percent, 0, 1, low_open=True, hint="e.g. 0.01")
    check_range("--num-samples", args.num_samples, 1)
    check_range("--max-tokens", args.max_tokens, 1)
    check_range("--threads", args.threads, 1)
    if args.calibration is not None:
        cal = args.calibration
        if not cal.exists():
            raise CliError(f"--calibration {cal}: no such file or folder",
                           "pass a .jsonl/.json/.txt file or a folder of images and texts")
        if cal.is_file() and cal.suffix not in (".jsonl", ".json", ".txt"):
            raise CliError(f"--calibration {cal}: a {cal.suffix or 'suffix-less'} file",
                           "calibration files are .jsonl, .json or .txt")
    info = inspect_model(args.model, None)
    if info.quantized:
        raise CliError(f"{args.model} is already quantized ({info.quantized}; config.json has quantization_config)",
                       "quantize the dense (BF16) checkpoint instead")
    out = args.out.expanduser()
    if info.folder is not None and out.resolve() == info.folder.resolve():
        raise CliError("--out is the --model folder", "write the quantized checkpoint to a new folder")
    if out.is_file():
        raise CliError(f"--out {out} is a file", "pass a folder that does not exist yet")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CliError(f"--out {out} already exists and is not empty", "pick a new folder, or add --force to "
                                                                       "overwrite it")
    return info


def run_quantize(args) -> int:
    info = check_quantize_args(args)
    import torch

    from ..hub import resolve_model_path
    from ..quant.gptq import GPTQParams
    from ..quant.gptq_format import GPTQSpec
    from ..quant.quantize_cli import quantize_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = GPTQSpec(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=args.desc_act,
                    format=args.format)
    if not args.sym and args.format == "gptq":
        print("note: asymmetric zeros of 0 cannot be stored exactly in the v1 'gptq' format by most readers; "
              "consider --format gptq_v2")
    params = GPTQParams(damp_percent=args.damp_percent, static_groups=args.static_groups)
    src = info.folder if info.folder is not None else resolve_model_path(args.model)
    result = quantize_folder(src, args.out, spec, params, args.calibration, args.num_samples, args.max_tokens,
                             progress=not args.quiet, dtype=args.dtype)
    worse = [r for r in result.reports if r.gptq_error > r.rtn_error]
    mean = sum(r.gptq_error for r in result.reports) / len(result.reports)
    mean_rtn = sum(r.rtn_error for r in result.reports) / len(result.reports)
    print(f"quantized {len(result.reports)} linears: mean relative output error GPTQ {mean:.3e} vs round-to-nearest "
          f"{mean_rtn:.3e}" + (f"; {len(worse)} layers where RTN was better" if worse else ""))
    out = args.out.expanduser()
    print(f"wrote {out}:")
    for f in sorted(out.iterdir()):
        if f.is_file():
            print(f"  {f.name:<40} {f.stat().st_size:>14,} bytes")
    return 0
