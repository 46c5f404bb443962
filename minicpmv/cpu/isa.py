"""What this CPU can do: the instruction-set level the kernels are chosen from.

Sources, in order: torch's own dispatch level (`torch.backends.cpu.get_cpu_capability()`, what
its vectorised kernels were compiled for and picked at start-up), and the kernel's feature flags
(/proc/cpuinfo `flags` on x86, `Features` on ARM), which add what torch's level does not name:
AVX512-BF16 (native bf16 dot products), VNNI, AMX tiles. Machines of one kind differ from day
to day (an AVX2-only AMD box one day, a Xeon with AMX the next), so this is read at every start.

`MINICPMV_CPU_ISA` (or `detect(force=...)`) lowers the level, e.g. `avx2` on an AMX machine
brings back the kernels chosen for AVX2-only CPUs; it cannot claim units the CPU lacks."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

ENV_ISA = "MINICPMV_CPU_ISA"

# Levels per architecture, weakest first. Each adds what the kernel choice depends on:
#   x86: avx2 (FMA, F16C: fbgemm fp16), avx512 (wider vectors), avx512_bf16 (vdpbf16ps: bf16 math at
#   twice fp32's rate), amx (tile matrix units: bf16 GEMMs ~6x fp32).
#   arm: neon, sve (wider vectors), neon_bf16 (BF16 dot products / BFMMLA, with or without SVE).
X86_LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "amx")
ARM_LEVELS = ("generic", "neon", "sve", "neon_bf16")


@dataclass(frozen=True)
class CpuInfo:
    arch: str                      # "x86_64", "aarch64", ...
    model: str                     # model name as the kernel reports it
    flags: frozenset = field(default_factory=frozenset)
    torch_capability: str = ""     # torch's dispatch level, e.g. "AVX512", "AVX2", "DEFAULT"
    detected: str = "generic"      # the best level this CPU supports
    level: str = "generic"         # the level kernels are chosen for (detected, or lower when forced)
    forced: bool = False

    @property
    def levels(self) -> tuple[str, ...]:
        return X86_LEVELS if self.arch in ("x86_64", "AMD64", "i686") else ARM_LEVELS

    def at_least(self, level: str) -> bool:
        """Whether the chosen level includes `level` (a level of the other architecture: False)."""
        return level in self.levels and self.levels.index(self.level) >= self.levels.index(level)

    @property
    def fast_bf16(self) -> bool:
        """bf16 arithmetic faster than fp32 (native bf16 dot-product or matrix units)."""
        return self.at_least("avx512_bf16") or self.at_least("neon_bf16")

    def feature_line(self) -> str:
        names = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                 "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "bf16", "i8mm", "sve", "sve2"]
        present = [n for n in names if n in self.flags]
        return " ".join(present) or "(none of interest)"


def _read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("", {}) where there is none (macOS)."""
    try:
        text = path.read_text()
    except OSError:
        return "", frozenset()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
        if model and flags:
            break
    return model, frozenset(flags)


def level_from_flags(arch: str, flags: frozenset, torch_capability: str = "") -> str:
    """The best level the flags support. torch's capability counts too: it is what torch's own
    kernels run at, and on macOS (no /proc/cpuinfo) the only source."""
    cap = torch_capability.upper()
    if arch in ("x86_64", "AMD64", "i686"):
        if {"amx_tile", "amx_bf16"} <= flags:
            return "amx"
        if "avx512_bf16" in flags and "avx512bw" in flags:
            return "avx512_bf16"
        if "avx512f" in flags or cap == "AVX512":
            return "avx512"
        if "avx2" in flags or cap == "AVX2":
            return "avx2"
        return "generic"
    if arch in ("aarch64", "arm64"):
        if "bf16" in flags:
            return "neon_bf16"
        if "sve" in flags or cap.startswith("SVE"):
            return "sve"
        return "neon"  # NEON (ASIMD) is part of every AArch64 CPU
    return "generic"


def detect(force: str | None = None) -> CpuInfo:
    """This CPU's info, the level lowered to `force` or $MINICPMV_CPU_ISA when given."""
    force = force if force is not None else os.environ.get(ENV_ISA) or None
    return _detect(force.strip().lower() if force else None)


@lru_cache(maxsize=None)
def _detect(force: str | None) -> CpuInfo:
    arch = platform.machine()
    model, flags = _read_cpuinfo()
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        cap = ""
    detected = level_from_flags(arch, flags, cap)
    info = CpuInfo(arch=arch, model=model or platform.processor() or arch, flags=flags, torch_capability=cap,
                   detected=detected, level=detected)
    if force is None:
        return info
    levels = info.levels
    if force not in levels:
        raise ValueError(f"CPU ISA level {force!r} ({ENV_ISA} / isa=): expected one of {', '.join(levels)} on {arch}")
    if levels.index(force) > levels.index(detected):
        raise ValueError(f"CPU ISA level {force!r} ({ENV_ISA} / isa=): this CPU supports at most {detected!r}")
    return CpuInfo(arch=arch, model=info.model, flags=flags, torch_capability=cap, detected=detected,
                   level=force, forced=True)
