"""The random-number state of a process, as a checkpoint holds it: torch's CPU generator and, on
CUDA, the device's. Restoring it continues a run's noise (posterior draws) exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["rng_state", "restore_rng", "seeded"]


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators: ``{"torch": ..., "cuda": ...}`` (the latter on CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Draws from ``seed`` inside the block (CPU and, on CUDA, ``device``); the generators continue
    afterwards as if the block had drawn nothing."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def restore_rng(states: list[dict[str, Any]], rank: int, seed: int, device: torch.device) -> None:
    """Restore process ``rank``'s generators from a checkpoint's ``states`` (one per process of the
    run that wrote it); a process that run did not have draws from ``seed`` instead."""
    if rank >= len(states):
        torch.manual_seed(seed)
        return
    torch.set_rng_state(states[rank]["torch"])
    if "cuda" in states[rank] and device.type == "cuda":
        torch.cuda.set_rng_state(states[rank]["cuda"], device)
