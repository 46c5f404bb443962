"""`minicpmv info`: the command line of minicpmv/cpu/info.py, declared here without importing torch
(so `minicpmv --help` stays fast); the work is imported when the command runs."""
from __future__ import annotations

WEIGHT_FORMATS = ("int8", "int4")  # minicpmv.cpu.plan.WEIGHT_FORMATS (tests/test_cli_help.py keeps them equal)


def add_info_parser(sub, parents) -> None:
    p = sub.add_parser("info", parents=parents, help="show the CPU's features and the kernel chosen per op class",
                       description="Detect the CPU (torch's capability, /proc/cpuinfo flags) and print the "
                                   "kernel a CPU load would use for vision GEMMs, prefill GEMMs, decode GEMVs "
                                   "and the lm_head.",
                       epilog="MINICPMV_CPU_ISA=avx2 (or --isa avx2) forces the choices made for AVX2-only CPUs; "
                              "MINICPMV_CPU_CALIBRATE=1 calibrates at load when no cached calibration exists.")
    p.add_argument("--isa", help="lower the level the choice is made for (e.g. avx2, avx512)")
    p.add_argument("--weights", choices=list(WEIGHT_FORMATS), help="show the kernels of a load-time weight format")
    p.add_argument("--calibrate", action="store_true",
                   help="time the candidate kernels now (a few seconds) and cache the result for later loads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_info)


def run_info(args) -> int:
    from ..cpu.info import run_info as run

    return run(args)
