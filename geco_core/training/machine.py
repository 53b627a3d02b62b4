"""The machine a process trains on: its device, and on a CPU its threads (one per core no other
process is running on, :func:`free_cores`) and allocator (freed blocks kept in the heap,
:func:`keep_freed_memory`); their effect: docs/BENCHMARKS.md."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import statistics
import sys
import time

import torch

from geco_core.errors import ConfigError

__all__ = ["prepare_device", "keep_freed_memory", "free_cores"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
KEEP = 1 << 30  # bytes: blocks up to 1 GiB come from (and go back to) the heap, which is not trimmed


def prepare_device(name: str, threads: int | None, local_rank: int | None = None) -> torch.device:
    """The device ``train.device`` names (``auto``: CUDA where present; under several processes
    ``cuda`` is the GPU ``local_rank``), with a CPU's threads and allocator set for training."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but CUDA is not available on this machine")
    device = torch.device("cuda", local_rank) if name == "cuda" and local_rank is not None else torch.device(name)
    if threads is not None:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and (free := free_cores()) < torch.get_num_threads():
        torch.set_num_threads(free)
    if device.type == "cpu":
        keep_freed_memory()
    return device


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


def free_cores(samples: int = 5, interval: float = 0.02, loadavg: str = "/proc/loadavg") -> int:
    """The cores this process may use that no other process is running on now: the CPUs it is
    allowed (``sched_getaffinity``) minus the runnable tasks other than itself (the kernel's count
    in ``/proc/loadavg``, median of ``samples`` readings ``interval`` s apart); at least 1, and all
    of them where the count is not available."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = []
    for i in range(samples):
        try:
            with open(loadavg, encoding="ascii") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return cores
        if i + 1 < samples:
            time.sleep(interval)
    others = max(0, round(statistics.median(counts)) - 1)  # the reading process is runnable itself
    return max(1, cores - others)
