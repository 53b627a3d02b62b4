"""Optimiser steps that skip non-finite batches without asking the host.

A step whose loss or gradient is not finite must not reach the weights. Testing that with
``if torch.isfinite(loss):`` makes the host wait for the device every step. An optimiser with a
fused kernel (``torch.optim.Adam(..., fused=True)``, AdamW, SGD) takes the decision on the device
instead, through the ``found_inf`` tensor that ``torch.amp.GradScaler`` uses: where it is set the
kernel leaves the weights, the moments and the step count as they were.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["step_where", "step_if_finite"]


def step_where(optimizer: torch.optim.Optimizer, take: Tensor) -> None:
    """``optimizer.step()`` where the scalar bool tensor ``take`` is true, else nothing. Free of host
    syncs for a fused optimiser; any other reads ``take`` on the host (one sync)."""
    if not optimizer.defaults.get("fused"):
        if bool(take):
            optimizer.step()
        return
    optimizer.found_inf = (~take).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def step_if_finite(optimizer: torch.optim.Optimizer, *values: Tensor) -> Tensor:
    """Step unless one of ``values`` (the loss, a gradient norm, ...) holds NaN or infinity, and
    return whether it stepped (a scalar bool tensor on the device)::

        loss.backward()
        step_if_finite(optimizer, loss)
        geco.follow(optimizer)
    """
    finite = torch.stack([torch.isfinite(v).all() for v in values]).all()
    step_where(optimizer, finite)
    return finite
