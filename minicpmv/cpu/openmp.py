"""One OpenMP team per process: torch's parallel kernels run on the engine's thread only.

On Linux torch runs its intra-op threads through libgomp, which gives every thread that starts a
parallel region a team of worker threads of its own. Once more threads sit in the process's teams
than it has CPUs, libgomp stops spin-waiting between parallel regions (its "throttled" spin count,
~100 spins): each worker sleeps on a futex after every region and the next region first wakes it.
A decode step is ~100 short regions, so every step pays those wake-ups. On 2 cores a helper thread
that once ran one torch op on a large tensor was enough: measured on the real-size 4.6 in process
(2026-12-02, Zen 4, 4 alternated rounds), 16-bit decode 16.1 -> 12.8 tok/s and 448x448 TTFT
2.18 -> 2.57 s while such a thread lived; through `minicpmv serve`, whose prepare threads decode
and normalise images with torch, batch-1 decode ran 10.6 tok/s after an image request against
18.7 with those threads confined (same run, both servers resident).

`confine_thread()` makes the calling thread run torch's ops on itself alone (it never forms a
team); the server's prepare threads call it when they start. The engine's thread keeps the
process's thread count (`--threads`)."""
from __future__ import annotations

import ctypes
import functools
import os


@functools.lru_cache(maxsize=None)
def libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (its OpenMP runtime), or None where torch's threads are not libgomp's."""
    import torch

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith("libgomp"):
            try:
                lib = ctypes.CDLL(path)
                lib.GOMP_parallel, lib.omp_set_num_threads  # noqa: B018 - both must exist
                return lib
            except (OSError, AttributeError):
                continue
    return None


def confine_thread() -> bool:
    """Run torch's ops on the calling thread alone, without changing the process's thread count
    (torch.set_num_threads would: it also sets the count every later thread starts from). True when
    confined; False where the runtime is not libgomp (then nothing changes)."""
    import torch

    lib = libgomp()
    if lib is None:
        return False
    torch.get_num_threads()  # torch sets a thread's OpenMP count on its first call: let it happen first
    lib.omp_set_num_threads(1)  # this thread's own setting (an OpenMP ICV), not the process's
    return torch.get_num_threads() == 1
