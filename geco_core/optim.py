"""Optimiser steps that skip non-finite batches without asking the host.

A step whose loss or gradient is not finite must not reach the weights. Testing that with
``if torch.isfinite(loss):`` makes the host wait for the device every step. An optimiser with a
fused kernel (``torch.optim.Adam(..., fused=True)``, AdamW, SGD) takes the decision on the device
instead, through the ``found_inf`` tensor that ``torch.amp.GradScaler`` uses: where it is set the
kernel leaves the weights, the moments and the step count as they were.

The gradient is judged by its 2-norm, ``sqrt(sum g_i^2)`` computed in the gradient's precision: it
is not finite as soon as one ``g_i^2`` overflows, so a step that is taken never puts an infinite
square into Adam's second moment (an average of squared gradients), and the optimiser's state stays
finite without a check of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["grad_norm", "finite_step", "scale_optimizer_state", "step_where", "step_unless", "step_if_finite"]


def grad_norm(optimizer: torch.optim.Optimizer, clip: float | None = None) -> Tensor:
    """The 2-norm of every gradient the optimiser holds (on one device), as one vector: a scalar
    tensor, the value of ``nn.utils.get_total_norm``. With ``clip``, the gradients are then scaled
    to a norm of at most ``clip`` (``nn.utils.clip_grads_with_norm_``); the norm returned is the
    one before clipping."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
    if clip is not None:
        nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def finite_step(loss: Tensor, norm: Tensor) -> Tensor:
    """Scalar bool: whether the (scalar) loss and the gradients' 2-norm are both finite. One
    operation: a finite norm is below 2e19, so adding it never overflows a finite loss."""
    return torch.isfinite(norm + loss.detach())


def step_unless(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """``optimizer.step()`` unless the scalar bool tensor ``skip`` is true. Free of host syncs for a
    fused optimiser (``skip`` becomes its ``found_inf``); any other reads ``skip`` on the host."""
    if not optimizer.defaults.get("fused"):
        if not bool(skip):
            optimizer.step()
        return
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def step_where(optimizer: torch.optim.Optimizer, take: Tensor) -> None:
    """``optimizer.step()`` where the scalar bool tensor ``take`` is true (:func:`step_unless`)."""
    step_unless(optimizer, ~take)


def step_if_finite(optimizer: torch.optim.Optimizer, loss: Tensor, *values: Tensor) -> Tensor:
    """Step unless the loss, the gradients' 2-norm (:func:`grad_norm`) or one of ``values`` holds
    NaN or infinity, and return whether it stepped (a scalar bool tensor on the device)::

        loss.backward()
        step_if_finite(optimizer, loss)
        geco.follow(optimizer)
    """
    finite = torch.stack([finite_step(loss, grad_norm(optimizer)), *(torch.isfinite(v).all() for v in values)]).all()
    step_where(optimizer, finite)
    return finite


def scale_optimizer_state(optimizer: torch.optim.Optimizer, factor: Tensor) -> None:
    """Multiply every tensor of the optimiser's state (moments, step counts) by the scalar tensor
    ``factor``, on the device, one fused multiply per device and dtype: ``factor = 0`` starts
    Adam afresh as ``state.clear()`` would, without a host sync."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                by_kind.setdefault((value.device, value.dtype), []).append(value)
    for (device, dtype), tensors in by_kind.items():
        torch._foreach_mul_(tensors, factor.to(device=device, dtype=dtype))
