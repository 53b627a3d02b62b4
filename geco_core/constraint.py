"""The Constraint protocol: what a reconstruction must achieve, as values that are ``<= 0`` when met.

A constraint maps a :class:`Batch` to per-example values of shape ``(batch, dim)``. Component ``j`` of
example ``i`` is satisfied where ``values[i, j] <= 0``; GECO keeps one Lagrange multiplier per
component and drives the batch mean of each component to ``<= 0``.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Protocol, runtime_checkable

import attrs
from torch import Tensor, nn

__all__ = ["Batch", "Constraint", "ConstraintLike", "freeze", "check_same_shape", "component_names"]


@attrs.frozen(eq=False)
class Batch:
    """What a constraint sees of one training batch.

    x:       targets, ``(B, C, H, W)``, pixels in [0, 1]
    x_hat:   reconstructions (decoder means), same shape as ``x``
    labels:  integer class labels ``(B,)`` or ``(B, k)`` for stacked digits, if the data has them
    context: conditioning images of a conditional model, if any
    index:   the examples' positions in their dataset (lets a constraint cache per-example work)
    """

    x: Tensor
    x_hat: Tensor
    labels: Tensor | None = None
    context: Tensor | None = None
    index: Tensor | None = None


@runtime_checkable
class ConstraintLike(Protocol):
    """Anything GECO can stack: a registry ``name``, a number of components ``dim``, and a call."""

    name: str
    dim: int

    def __call__(self, batch: Batch) -> Tensor: ...


class Constraint(nn.Module, abc.ABC):
    """Base class for constraints: ``forward(batch) -> (B, dim)``, satisfied where ``<= 0``.

    Subclasses set the class attributes ``name`` (the registry name) and ``units`` (of kappa), and the
    instance attribute ``dim``; optionally ``component_names`` (one label per component). Networks
    inside a constraint that must never learn go through :func:`freeze`; they stay in eval mode even
    when GECO is put in training mode.
    """

    name: ClassVar[str] = ""
    units: ClassVar[str] = ""
    dim: int = 1

    @abc.abstractmethod
    def forward(self, batch: Batch) -> Tensor:
        """Per-example values ``(B, dim)``; ``<= 0`` where satisfied."""

    def reached(self, values: Tensor) -> Tensor | None:
        """Constraint values mapped back to the units of kappa (RE: the pixel RMSE reached), for
        summaries and plots; None where that has no meaning."""
        return None

    def train(self, mode: bool = True) -> Constraint:
        super().train(mode)
        for module in self.modules():
            if getattr(module, "_geco_frozen", False):
                module.eval()
        return self


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a network used inside a constraint: eval mode, no gradient to (nor optimiser step on)
    its weights. Gradients still flow through it to its input (the reconstruction)."""
    module.requires_grad_(False)
    module.eval()
    module._geco_frozen = True  # read by Constraint.train
    return module


def check_same_shape(name: str, x: Tensor, x_hat: Tensor) -> None:
    """Raise a one-line ValueError when targets and reconstructions differ in shape."""
    if x.shape != x_hat.shape:
        raise ValueError(
            f"{name}: targets and reconstructions differ in shape: x {tuple(x.shape)} vs x_hat {tuple(x_hat.shape)}"
        )
    if x.ndim < 2:
        raise ValueError(f"{name}: expected a batch of shape (B, ...), got {tuple(x.shape)}")


def component_names(constraint: ConstraintLike) -> list[str]:
    """One label per component: the constraint's own ``component_names``, else ``name`` for a single
    component and ``name[j]`` for several."""
    names = getattr(constraint, "component_names", None)
    if names is not None:
        return list(names)
    n = constraint.name
    return [n] if constraint.dim == 1 else [f"{n}[{j}]" for j in range(constraint.dim)]
