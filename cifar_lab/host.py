"""The host the process runs on: what CPU it is (for measurement records) and how its memory is kept.

**Keeping freed memory.** 
glibc serves large allocations (above a threshold between 128 kB and 32 MB) with fresh
``mmap`` pages and unmaps them again on ``free``. A training step on the CPU allocates and
frees activation buffers of 100 MB and more, so every step page-faults them in anew: on a
2-core CPU that was 10% of a ``speedrun_net`` step at batch 1024 (0.93 s instead of 1.03 s,
measured in ``docs/benchmarks.md``). Serving every allocation from the heap and never
trimming it lets each step reuse the previous step's pages, which is what a GPU's caching
allocator does for device memory. The cost: the process keeps its peak host memory until it
exits, which suits a training process.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory(top_pad_bytes: int = 64 << 20) -> bool:
    """Switch glibc's malloc to heap-only allocation without trimming; False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter already uses
    except (OSError, AttributeError):  # no libc handle, or a libc without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX), (M_TOP_PAD, min(top_pad_bytes, _INT_MAX))))
    if not ok:
        log.warning("could not configure the C allocator (mallopt refused); host memory is returned as usual")
    return ok


# ----------------------------------------------------------------------------- the CPU
@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU model as the OS reports it (``/proc/cpuinfo`` on Linux)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where unknown)."""
    return set(_cpuinfo().get("flags", "").split())
