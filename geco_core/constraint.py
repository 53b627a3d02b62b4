"""The constraint contract: what a reconstruction must achieve, as values that are ``<= 0`` when met.

A constraint maps a :class:`Batch` to per-example values of shape ``(batch, dim)``. Component ``j`` of
example ``i`` is satisfied where ``values[i, j] <= 0``; GECO keeps one Lagrange multiplier per
component and drives the batch mean of each component to ``<= 0``.

Besides the call, the contract (:class:`ConstraintLike`) declares what the trainer, summaries and
plots read: ``name``, ``dim``, ``component_names``, ``kappa`` and its ``units``, ``reached`` (values
mapped back to the units of kappa), and two scales that let multiplier controllers work without
tuning: ``multiplier_scale`` (the lambda at which the constraint weighs as much as the KL; RE:
``D / (2 kappa^2)``, the ELBO's weight at sigma = kappa) and ``value_scale`` (the size of a
meaningful change of a value; RE: ``kappa^2``). :class:`Constraint` gives every member a default.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

import attrs
import torch
from torch import Tensor, nn

from geco_core.errors import ConfigError

T = TypeVar("T")
#: standard errors above the validation mean that GECO aims below kappa (a one-sided 95% bound;
#: chosen by measurement, docs/BENCHMARKS.md "The validation bound's confidence")
CONFIDENCE = 1.645

__all__ = [
    "Batch",
    "Units",
    "Constraint",
    "ConstraintLike",
    "CONTRACT",
    "freeze",
    "check_same_shape",
    "check_kappa",
    "missing_members",
    "ConstraintStack",
    "CONFIDENCE",
]


@attrs.define(eq=False, slots=False)  # not frozen: torch.compile traces plain attribute sets
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


@attrs.frozen
class Units:
    """A second unit for a constraint's kappa and reached values, which summaries, ``geco eval``
    and plots show beside the first (RE: PSNR in dB beside the pixel RMSE).

    name:    short, used in keys (``psnr``: ``reached_psnr`` in a summary row); a constraint that
             takes its kappa in this unit too names that option ``kappa_<name>`` (``kappa_psnr``)
    symbol:  printed after a value (``dB``)
    convert: from kappa's units to these; ``invert`` back
    """

    name: str
    symbol: str
    convert: Callable[[float], float]
    invert: Callable[[float], float]

    def format(self, value: float | None) -> str:
        """``" (20.0 dB)"``; empty for a missing value."""
        return "" if value is None else f" ({self.convert(value):.1f} {self.symbol})"


@runtime_checkable
class ConstraintLike(Protocol):
    """Anything GECO can stack. :class:`Constraint` provides every member but ``forward``."""

    name: str  # registry name
    dim: int  # number of components
    kappa: float  # the bound, in ``units``
    units: str
    multiplier_scale: float  # natural lambda (> 0), where the constraint weighs as much as the KL
    value_scale: float  # size of a meaningful change of a value (> 0), in value units

    @property
    def component_names(self) -> Sequence[str]: ...

    def reached(self, values: Tensor) -> Tensor | None:
        """Values ``(..., dim)`` mapped back to the units of kappa (RE: the pixel RMSE)."""
        ...

    def __call__(self, batch: Batch) -> Tensor:
        """Per-example values ``(B, dim)``; ``<= 0`` where satisfied."""
        ...


#: the members of the contract, checked by name when GECO is given a constraint
CONTRACT = ("name", "dim", "kappa", "units", "multiplier_scale", "value_scale", "component_names", "reached")


def missing_members(constraint: object) -> list[str]:
    """The members of :data:`CONTRACT` that ``constraint`` lacks (plus ``__call__``)."""
    missing = [m for m in CONTRACT if not hasattr(constraint, m)]
    return missing if callable(constraint) else [*missing, "__call__"]


class Constraint(nn.Module, abc.ABC):
    """Base class for constraints: ``forward(batch) -> (B, dim)``, satisfied where ``<= 0``.

    Subclasses set the class attributes ``name`` (the registry name) and ``units`` (of kappa), and
    the instance attributes ``kappa`` and ``dim``; where they can, ``multiplier_scale`` and
    ``value_scale`` (default 1: GECO then works on the raw values) and ``component_names``. Networks
    inside a constraint that must never learn go through :func:`freeze`; they stay in eval mode even
    when GECO is put in training mode.
    """

    name: ClassVar[str] = ""
    units: ClassVar[str] = ""
    also: ClassVar[Units | None] = None  # a second unit of kappa users think in, if any
    kappa: float = math.nan
    dim: int = 1
    multiplier_scale: float = 1.0
    value_scale: float = 1.0
    #: which way ``reached`` is tighter: -1 where smaller values are (an upper bound: RE), +1 where
    #: larger are (a lower bound: CLA, pNCC, SSIM); None: found from ``reached`` (:func:`tighter`)
    tighter: ClassVar[int | None] = None
    #: what ``reached`` gives for a perfect reconstruction (RE 0, pNCC 1); None: found from
    #: ``reached`` and ``value_scale`` (:func:`perfect`)
    perfect: ClassVar[float | None] = None
    #: standard errors of the validation mean that GECO's held-out target adds to it (GECO.validate);
    #: None: GECO's ``validation_confidence`` (:data:`CONFIDENCE`, a one-sided 95% bound, by
    #: default). A constraint whose per-example values are heavy-tailed may declare its own
    validation_confidence: float | None = None

    @abc.abstractmethod
    def forward(self, batch: Batch) -> Tensor:
        """Per-example values ``(B, dim)``; ``<= 0`` where satisfied."""

    @property
    def component_names(self) -> list[str]:
        """One label per component: ``name`` for one component, ``name[j]`` for several."""
        return [self.name] if self.dim == 1 else [f"{self.name}[{j}]" for j in range(self.dim)]

    def reached(self, values: Tensor) -> Tensor | None:
        """Constraint values mapped back to the units of kappa (RE: the pixel RMSE reached), for
        summaries and plots; None where that has no meaning."""
        return None

    def twin(self) -> ConstraintLike | None:
        """The same constraint judged by an independent network (the same recipe, another seed),
        where the constraint uses a learned one: reconstructions that fool this network should not
        fool its twin. None where there is none."""
        return None

    def judges(self) -> dict[str, ConstraintLike]:
        """The same constraint under networks that did not shape the reconstructions, by name: the
        twin and, where there are, networks of another recipe or architecture. Summaries and
        ``geco eval`` report the held-out value under each ("met under k of m judges"). Default:
        the twin alone, or none."""
        twin = self.twin()
        return {} if twin is None else {"twin": twin}

    def train(self, mode: bool = True) -> Constraint:
        super().train(mode)
        for module in self.modules():
            if getattr(module, "_geco_frozen", False):
                module.eval()
        return self


def tighter(constraint: ConstraintLike) -> int:
    """-1 where smaller values of ``reached`` are tighter (an upper bound: RE), +1 where larger are
    (a lower bound: CLA, pNCC): the constraint's ``tighter`` where it declares one, else read off
    ``reached`` just inside the bound (-1 for a constraint without ``reached``)."""
    declared = getattr(constraint, "tighter", None)
    if declared is not None:
        return int(declared)
    probe = constraint.reached(torch.tensor([-1e-3 * float(constraint.value_scale)] * constraint.dim))
    if probe is None:
        return -1
    return -1 if float(probe.mean()) < float(constraint.kappa) else 1


def perfect(constraint: ConstraintLike) -> float:
    """What ``reached`` gives for a perfect reconstruction: the constraint's ``perfect`` where it
    declares one, else ``reached`` at ``-value_scale`` (the declared distance from the bound to
    perfection: RE's RMSE 0, pNCC's correlation 1); 0 for a constraint without ``reached``."""
    declared = getattr(constraint, "perfect", None)
    if declared is not None:
        return float(declared)
    value = constraint.reached(torch.full((constraint.dim,), -float(constraint.value_scale)))
    return float(value.mean()) if value is not None else 0.0


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


def check_kappa(
    name: str, kappa: object, low: float, high: float = math.inf, *, what: str, closed_high: bool = False
) -> float:
    """``kappa`` as a float if it is a number in ``(low, high)`` (``(low, high]`` with
    ``closed_high``); else a one-line :class:`ConfigError` saying what it must be (``what``)."""
    number = isinstance(kappa, int | float) and not isinstance(kappa, bool)
    inside = number and low < kappa and (kappa <= high if closed_high else kappa < high)
    if not inside:
        raise ConfigError(f"{name}: kappa must be {what}, got {kappa!r}")
    return float(kappa)


class ConstraintStack:
    """Constraints stacked in order, their components forming one vector of length L.

    Names are made unique (two ``re`` become ``re`` and ``re#2``; their components likewise), so
    everything per component or per constraint can be keyed by name."""

    def __init__(self, constraints: Sequence[ConstraintLike]) -> None:
        if not constraints:
            raise ConfigError("GECO needs at least one constraint")
        for c in constraints:
            missing = missing_members(c)
            if missing:
                raise ConfigError(f"not a constraint: {c!r} lacks {', '.join(missing)} (subclass geco_core.Constraint)")
            if not isinstance(c.dim, int) or c.dim < 1 or len(c.component_names) != c.dim:
                raise ConfigError(f"constraint {c.name!r}: dim must be >= 1 with one component name each")
        self.constraints = list(constraints)
        self.dims = [int(c.dim) for c in constraints]
        self.names = unique_names([c.name for c in constraints])
        self.component_names = unique_names([n for c in constraints for n in c.component_names])
        #: the (unique) name of the constraint each component belongs to
        self.component_constraints = self.per_component(self.names)

    def per_component(self, per_constraint: Sequence[T]) -> list[T]:
        """One entry per constraint repeated for each of its components: a list of length L."""
        return [v for v, dim in zip(per_constraint, self.dims) for _ in range(dim)]

    def __len__(self) -> int:
        return len(self.constraints)

    @property
    def num_components(self) -> int:
        """L, the length of the constraint vector."""
        return sum(self.dims)

    @property
    def by_name(self) -> dict[str, ConstraintLike]:
        """The constraints by (unique) name, in order."""
        return dict(zip(self.names, self.constraints))

    def evaluate(self, batch: Batch) -> Tensor:
        """Per-example values of every constraint, stacked in order: ``(B, L)``."""
        values = []
        for c, dim in zip(self.constraints, self.dims):
            v = c(batch)
            if v.ndim != 2 or v.shape[1] != dim:
                raise ValueError(f"constraint {c.name!r} returned shape {tuple(v.shape)}, expected (batch, {dim})")
            values.append(v)
        return torch.cat(values, dim=1)

    def split(self, tensor: Tensor) -> dict[str, Tensor]:
        """Views of a ``(..., L)`` tensor, one ``(..., dim)`` per constraint, by constraint name."""
        if tensor.shape[-1] != self.num_components:
            raise ValueError(f"split needs a last dimension of {self.num_components}, got {tuple(tensor.shape)}")
        return dict(zip(self.names, tensor.split(self.dims, dim=-1)))

    def reached(self, values: Tensor) -> Tensor:
        """Values ``(..., L)`` mapped back to each constraint's kappa units (``reached``); NaN for
        the components of a constraint that has none."""
        parts = []
        for c, part in zip(self.constraints, self.split(values).values()):
            mapped = c.reached(part)
            parts.append(torch.full_like(part, math.nan) if mapped is None else mapped.to(part.dtype))
        return torch.cat(parts, dim=-1)


def unique_names(names: Sequence[str]) -> list[str]:
    """Suffix repeated names: ``[re, re]`` becomes ``[re, re#2]``."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
