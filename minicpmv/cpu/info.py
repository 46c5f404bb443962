"""`minicpmv info`: what this CPU can do and which kernel each op class will run (its command line is
declared in minicpmv/cli/info.py, without torch)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import calibrate as cal
from .isa import ENV_ISA
from .plan import check_weights, choose


def run_info(args: argparse.Namespace) -> int:
    try:
        plan = choose(args.isa, calibrate=True if args.calibrate else None)
        weights = check_weights(args.weights)
    except ValueError as e:
        print(f"minicpmv: error: {e}", file=sys.stderr)
        return 2
    cpu = plan.cpu
    result = None if cpu.forced else cal.load_or_run(cpu)
    rows = plan.rows(weights)
    if args.json:
        print(json.dumps({"cpu": cpu.model, "arch": cpu.arch, "level": cpu.level, "detected": cpu.detected,
                          "forced": cpu.forced, "torch": torch.__version__, "torch_capability": cpu.torch_capability,
                          "threads": torch.get_num_threads(), "features": cpu.feature_line().split(),
                          "source": plan.source, "kernels": dict(rows),
                          "calibration": None if result is None else {k: v for k, v in result.items() if k != "key"}}))
        return 0
    forced = f", forced by {ENV_ISA}/--isa (detected {cpu.detected})" if cpu.forced else ""
    print(f"CPU       {cpu.model} ({cpu.arch}), level {cpu.level}{forced}")
    print(f"features  {cpu.feature_line()}")
    print(f"torch     {torch.__version__}, capability {cpu.torch_capability or '?'}, "
          f"{torch.get_num_threads()} threads, fbgemm {'yes' if 'fbgemm' in torch.backends.quantized.supported_engines else 'no'}")
    print(f"choice    {plan.source}")
    for op, kernel in rows:
        print(f"  {op:<14} {kernel}")
    if result is not None:
        for table in ("gemm_256x1024x2048_ms", "gemv_4096x2048_ms"):
            timings = ", ".join(f"{k} {v:.3g}" for k, v in result[table].items())
            print(f"  {table}: {timings}  (measured {result.get('when', '?')}; noisy on a shared machine)")
    return 0
