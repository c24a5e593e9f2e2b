"""Keep freed host memory in the process instead of handing it back to the OS after every step.

glibc's malloc serves large blocks with mmap and returns them with munmap, and trims the heap top when it is
freed. A training step allocates and frees the same activation tensors every time, so each step then pays
page faults (the kernel zeroes every new page) for memory it just gave back. On the 2-core CPU machine that
was about 1.2 s of system time in a 3.9 s SD 1.5-sized LoRA step (`bench/vs_reference.py`). Raising the mmap
and trim thresholds to their maximum keeps those blocks in the heap for reuse; peak memory is unchanged,
as the process needed it anyway. It is what tcmalloc or jemalloc would do, without preloading a library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
M_MMAP_THRESHOLD = -3
LARGEST = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to their maximum; True when applied (Linux with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST)) and bool(mallopt(M_TRIM_THRESHOLD, LARGEST))
