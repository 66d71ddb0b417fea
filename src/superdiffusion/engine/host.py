"""Process-wide settings of the host C library (CPU training only; GPU memory has its own allocator)."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def hold_freed_memory(*, mmap_threshold: int = 128 << 20) -> bool:
    """Keep freed tensor memory in the heap for the next step instead of returning it to the system.

    Why: glibc serves every block over its mmap threshold with fresh pages and unmaps them on free, so each
    training step faults in and zeroes its activations again (on the reference co-training step, about
    280 000 page faults and 0.5 s of system time per step). Held, a step re-uses the same pages: 1.07-1.27x
    faster steps on 2 cores, for ~0.1 GiB more peak memory (heap fragmentation). Returns False, changing
    nothing, where the C library has no mallopt (musl, macOS, Windows).
    """
    path = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(path).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
