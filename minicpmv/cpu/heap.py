"""glibc's heap settings while a model runs on the CPU, and giving freed pages back.

A prompt's activations are tensors of megabytes (a 512-token chunk of the real-size 4.6 makes
~16 MB ones), allocated and freed by the hundred per forward. glibc serves every allocation over
its mmap threshold (128 KB to 32 MB, adapting) with a fresh mapping and unmaps it on free, and a
thread's own arena (the server's engine thread) keeps heaps of at most 64 MB: each such tensor
then pays a page fault per 4 KB it touches. Measured on the real-size 4.6, 2 threads: a 512-token
prefill took ~430k page faults and ~1 s of kernel time (2.62 s wall) with the defaults, 41k and
0.1 s (1.70 s) with the settings below; a 2,048-token one in a worker thread 0.3-1.4 M faults and
1.6-3.7 s of kernel time, ~1-7k and 0.1 s with one arena. (vLLM's CPU build asks for tcmalloc
through LD_PRELOAD for the same reason.)

`keep_warm()` (called once a CPU model is loaded): allocations up to 512 MB come from the heap,
up to 1 GB freed at its top stays mapped, and all threads share the main arena (whose heap has
no 64 MB cap). What stays mapped is what the busiest step needed; `release()` gives it back (the
server calls it once the engine has idled for `idle_release_s()`, the loader after replacing
weights).
$MINICPMV_HEAP=default leaves glibc's settings alone. A no-op where glibc is not the allocator.

2 MB pages (`ask_huge_pages`, at `import minicpmv`): torch backs CPU tensors of 2 MB and more with
transparent huge pages when $THP_MEM_ALLOC_ENABLE is 1 at its first allocation, so that is set
before torch is imported; the state pool's tensors are advised either way (`advise_huge`), so a
prompt's first write to KV blocks or state slots faults 2 MB at a time instead of 4 KB (~4,500
faults of 4 KB per 512-token prompt of the real-size 4.6 otherwise, 30-60 us each in the Firecracker
VM of 2026-12-03). Real-size 4.6 there, two processes alternated (8 pairs, two runs): pp512 1.05x /
1.09x, the 448x448 first token 0.96x the time, decode 0.98-1.11x (inside the noise), peak RSS the
same (docs/performance.md)."""
from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
ENV = "MINICPMV_HEAP"
IDLE_ENV = "MINICPMV_HEAP_IDLE_S"
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # torch's switch, read once, at its first CPU allocation
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_huge_pages = "not asked (minicpmv/__init__ calls ask_huge_pages)"


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode (always / madvise / never), None where there is none."""
    try:
        text = open(THP_MODE).read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def ask_huge_pages() -> str:
    """Ask torch for 2 MB pages under its large CPU tensors, once, before torch is imported; returns
    (and remembers for the load log) what was done."""
    global _huge_pages
    mode = thp_mode()
    if os.environ.get(ENV, "").lower() == "default":
        _huge_pages = f"torch's default (${ENV}=default)"
    elif THP_ENV in os.environ:
        _huge_pages = f"${THP_ENV}={os.environ[THP_ENV]} as set by the caller"
    elif mode in (None, "never"):
        _huge_pages = "none: the kernel has no transparent huge pages" + (" (mode never)" if mode else "")
    elif "torch" in sys.modules:
        _huge_pages = f"not asked: torch was imported before minicpmv (set {THP_ENV}=1 before importing torch)"
    else:
        os.environ[THP_ENV] = "1"
        _huge_pages = f"asked for tensors of 2 MB+ (${THP_ENV}=1, kernel mode {mode})"
    return _huge_pages


MADV_HUGEPAGE = 14


def advise_huge(t) -> bool:
    """Advise 2 MB pages for a CPU tensor's whole 2 MB-aligned interior before its first write
    (no-op where the kernel has no THP, or huge pages were declined). Returns whether it advised."""
    libc = _libc()
    if (libc is None or thp_mode() != "madvise" or os.environ.get(ENV, "").lower() == "default"
            or os.environ.get(THP_ENV) == "0" or t.device.type != "cpu"):
        return False
    huge = 2 << 20
    start = t.data_ptr()
    end = start + t.untyped_storage().nbytes()
    lo, hi = -(-start // huge) * huge, end // huge * huge
    if hi <= lo:
        return False
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(lo, hi - lo, MADV_HUGEPAGE) == 0


def huge_pages() -> str:
    """What ask_huge_pages did, and how much of the process sits in 2 MB pages now (load log)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
        return f"{_huge_pages}; {kb / 2**20:.2f} GB in 2 MB pages"
    except (OSError, StopIteration, ValueError):
        return _huge_pages


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (glibc)
        return libc
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def keep_warm() -> str:
    """Set the heap up for inference once per process; returns what was done (for the load log)."""
    libc = _libc()
    if libc is None:
        return "not glibc: allocator left as is"
    if os.environ.get(ENV, "").lower() == "default":
        return f"glibc defaults (${ENV}=default)"
    ok = (libc.mallopt(M_MMAP_THRESHOLD, 512 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
          and libc.mallopt(M_ARENA_MAX, 1))
    return "kept warm (tensors up to 512 MB from one shared heap)" if ok else "glibc refused the settings"


def idle_release_s() -> float:
    """How long the server's engine stays idle before release() ($MINICPMV_HEAP_IDLE_S, default 30 s):
    released at once, the next request faulted its tensors back in (448x448 image TTFT of the
    real-size 4.6 ~0.2 s slower after a release, 10 alternated pairs in the VM of 2026-12-03)."""
    try:
        return max(0.0, float(os.environ.get(IDLE_ENV, "30")))
    except ValueError:
        return 30.0


def release() -> None:
    """Give the heap's free pages back to the OS (after a load replaced weights, or when idle)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
