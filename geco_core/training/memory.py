"""Keep freed memory in the process: glibc hands large blocks (over its mmap threshold, 128 kB to
32 MB) back to the operating system on free and faults them in again on the next allocation. A
training step frees and reallocates the same large activations every step; with 64x64 images and
batches of 128 or more that round trip cost about half the throughput (docs/BENCHMARKS.md,
"Image size and batch"). Raising glibc's mmap and trim thresholds keeps those blocks in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
KEEP = 1 << 30  # bytes: blocks up to 1 GiB come from (and go back to) the heap, which is not trimmed


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks (once per process); False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP))
    except (OSError, AttributeError):
        return False
