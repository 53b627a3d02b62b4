"""Multiplier controllers: how GECO's lambda starts and moves, and how it weighs the loss.

Three pieces, as in Cooper: GECO holds the multipliers (``log lambda``) and Algorithm 1's
bookkeeping (``c_hat``, the moving average ``c_ma``, bounds, warm-up, synchronisation); a
:class:`Formulation` says how lambda weighs the constraint in the loss; a :class:`Controller` is the
rule that moves lambda. A controller sees only :class:`Signals` (the moving averages, the step, the
constraints' declared scales) and its own options, never GECO itself. Per component::

    paper       log lambda^0 = log lambda_init
                log lambda^t = log lambda^(t-1) + lr * c_ma^t                     (Algorithm 1)
    scaled      log lambda^0 = log(lambda_init * start * s)    s = multiplier_scale (RE: D / 2 kappa^2)
                log lambda^t = log lambda^(t-1) + step * lr * clip(e^t, -1, 1),  lambda <= max_factor * s
                                                               e = c_ma / value_scale (RE: kappa^2)
    restart     scaled, and the first time a violated component turns satisfied (c_ma <= 0) its
                log lambda restarts midway to log lambda^0 (Gallego-Posada et al. 2022), and the
                optimiser's state is cleared
    nupi        log lambda^t = log lambda^0 + step * lr * (ki * sum_s e^s + kp * xi^t),
                xi^t = nu * xi^(t-1) + (1 - nu) * e^t              (nuPI, Sohrabi et al. 2024)
    ramp        lambda = s * (a climb as restart's, held high, then exponentially down): a fixed
                schedule, the ramp of ``geco find-kappa``

Every controller but ``paper`` and ``ramp`` also stops a component's lambda from growing while its constraint
is violated and has not improved its best relative value ``e`` (since it was last satisfied) by
``tolerance`` (of itself, where it exceeds 1) for ``patience`` updates: the constraint is reported
``unreachable`` (GECO's state, the summary, the progress bar) with the best value and the step it
was reached, and lambda resumes as soon as it improves again.

How lambda weighs the loss is chosen apart, as GECO's ``formulation`` (Cooper's split of the
multiplier's update from the formulation): ``lagrangian`` (Algorithm 1's ``KL + lambda . C``) or
``normalised`` (:class:`NormalisedLagrangian`, divided by ``1 + sum lambda / s``).

Controllers register through the ``geco_register_controllers`` hook like constraints do, so a
third-party package can ship one: subclass :class:`Controller`, set ``name``, implement ``update``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import attrs
import torch
from torch import Tensor, nn

from geco_core.errors import ConfigError
from geco_core.hookspecs import hookimpl

__all__ = [
    "Signals",
    "Progress",
    "Formulation",
    "Lagrangian",
    "NormalisedLagrangian",
    "FORMULATIONS",
    "build_formulation",
    "Controller",
    "Paper",
    "Scaled",
    "Restart",
    "NuPI",
    "Ramp",
    "DEFAULT",
]

#: the controller GECO uses unless told otherwise: the winner of benchmarks/multipliers.py
DEFAULT = "restart"


class Signals(NamedTuple):  # a tuple: torch.compile traces it whole
    """What a controller sees at an update, per component ``(L,)`` unless scalar.

    c_ma:             the new moving average of the constraint
    step:             updates applied before this one (long scalar)
    finite:           whether this update's ``c_hat`` was finite (bool scalar); GECO keeps its
                      buffers where it was not, and a controller keeps its own
    lr:               the step size on ``log lambda`` (GECO's ``lr``)
    multiplier_scale: the constraints' natural lambda (``ConstraintLike.multiplier_scale``)
    value_scale:      the size of a meaningful change of a value (``ConstraintLike.value_scale``)
    """

    c_ma: Tensor
    step: Tensor
    finite: Tensor
    lr: Tensor
    multiplier_scale: Tensor
    value_scale: Tensor


@attrs.frozen(eq=False)
class Progress:
    """What a controller says of each component ``(L,)`` beside lambda, for GECO's state.

    unreachable: bool, lambda held because the violated constraint stopped improving
    best:        the best ``c_ma`` (value units) since the component was last satisfied; NaN: none
    best_step:   the update at which ``best`` was reached; -1: none
    extra:       anything else, by name (``restart``: ``restarted``)
    """

    unreachable: Tensor | None = None
    best: Tensor | None = None
    best_step: Tensor | None = None
    extra: Mapping[str, Tensor] = attrs.field(factory=dict)


class Formulation(abc.ABC):
    """How lambda weighs the constraint in the loss."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def __call__(self, kl: Tensor, lambdas: Tensor, c: Tensor, multiplier_scale: Tensor) -> Tensor:
        """The loss from the mean KL, lambda ``(L,)``, the constraint ``c`` ``(L,)`` and the
        natural multiplier scales ``(L,)``."""


class Lagrangian(Formulation):
    """Algorithm 1's loss: ``KL + lambda . C``."""

    name = "lagrangian"

    def __call__(self, kl: Tensor, lambdas: Tensor, c: Tensor, multiplier_scale: Tensor) -> Tensor:
        return kl + (lambdas * c).sum()


class NormalisedLagrangian(Formulation):
    """``(KL + lambda . C) / (1 + sum_i lambda_i / s_i)``: the gradient keeps the scale of the KL
    (small lambda) or of ``s . C`` (large lambda), so Adam's moment estimates stay valid while
    lambda moves by orders of magnitude."""

    name = "normalised"

    def __call__(self, kl: Tensor, lambdas: Tensor, c: Tensor, multiplier_scale: Tensor) -> Tensor:
        norm = 1 + (lambdas / multiplier_scale.to(lambdas.dtype)).sum()
        return (kl + (lambdas * c).sum()) / norm


#: the loss formulations by name (``GECO(formulation=...)``)
FORMULATIONS: dict[str, Formulation] = {f.name: f for f in (Lagrangian(), NormalisedLagrangian())}


def build_formulation(spec: str | Formulation) -> Formulation:
    """A formulation from its name (:data:`FORMULATIONS`) or itself."""
    if isinstance(spec, Formulation):
        return spec
    if spec not in FORMULATIONS:
        raise ConfigError(f"formulation must be one of {', '.join(FORMULATIONS)}, got {spec!r}")
    return FORMULATIONS[spec]


class Controller(nn.Module, abc.ABC):
    """The rule that moves lambda (how lambda weighs the loss is GECO's ``formulation``, chosen
    apart). Subclasses set ``name``; ``restarts`` if ``update`` can restart lambda, a jump (GECO
    then asks the optimiser to follow, :meth:`GECO.follow`); and list in ``component_buffers`` every buffer with
    one entry per component (its state is then matched by component name when loaded)."""

    name: ClassVar[str] = ""
    restarts: ClassVar[bool] = False
    component_buffers: ClassVar[tuple[str, ...]] = ()

    def initial_log_lambdas(self, lambda_init: Tensor, multiplier_scale: Tensor) -> Tensor:
        """``log lambda^0`` from GECO's ``lambda_init`` (L,)."""
        return lambda_init.log()

    def setup(self, log_lambdas: Tensor) -> None:
        """Called once with ``log lambda^0`` (after GECO's bounds): size per-component state here."""

    @abc.abstractmethod
    def update(self, log_lambdas: Tensor, signals: Signals) -> tuple[Tensor, Tensor]:
        """The new ``log lambda`` (before GECO's bounds) and a scalar bool: whether this step restarted
        a multiplier.
        Own buffers change only where ``signals.finite``."""

    def progress(self, signals: Signals) -> Progress:
        """What this controller reports of each component (nothing by default)."""
        return Progress()

    def may_restart(self) -> Tensor | None:
        """A scalar bool tensor: whether ``update`` can still restart (a controller that restarts a
        bounded number of times says when it is done); None: as ``restarts``."""
        return None

    @staticmethod
    def no_restart(like: Tensor) -> Tensor:
        """The scalar ``False`` that :meth:`update` returns for a step that restarts nothing."""
        return torch.zeros((), dtype=torch.bool, device=like.device)


class Paper(Controller):
    """Algorithm 1 exactly: lambda starts at ``lambda_init`` and ``log lambda += lr * c_ma``."""

    name = "paper"

    def update(self, log_lambdas: Tensor, signals: Signals) -> tuple[Tensor, Tensor]:
        return log_lambdas + signals.lr * signals.c_ma, self.no_restart(log_lambdas)


class Scaled(Controller):
    """Lambda from the constraint's own scale, moved by its relative violation.

    ``log lambda^0 = log(lambda_init * start * s)`` with ``s = multiplier_scale``; ``log lambda +=
    step * lr * clip(e + margin, -1, clip)`` with ``e = c_ma / value_scale`` (RE: ``(mse -
    kappa^2) / kappa^2``), never beyond ``max_factor * s``. ``margin`` (relative, default 0) aims
    inside the bound by hand; GECO's generalisation gap, measured on validation data, already
    aims where held-out data meets it (:meth:`GECO.validate`). While a
    violated component has not improved its best ``e`` by ``tolerance`` (relative, where ``e > 1``)
    for ``patience`` updates, its lambda does not grow (``patience = 0`` turns this off)."""

    name = "scaled"
    component_buffers = ("best", "best_step")

    def __init__(
        self,
        step: float = 0.05,
        start: float = 1e-3,
        clip: float = 1.0,
        margin: float = 0.0,
        max_factor: float = 100.0,
        patience: int = 500,
        tolerance: float = 0.01,
    ) -> None:
        super().__init__()
        if not 0 <= margin < 1:
            raise ConfigError(f"controller margin must be in [0, 1), got {margin!r}")
        for key, value, low in (("step", step, 0.0), ("start", start, 0.0), ("clip", clip, 0.0)):
            if not low < value < math.inf:
                raise ConfigError(f"controller {key} must be > 0 and finite, got {value!r}")
        if not 1 <= max_factor < math.inf:
            raise ConfigError(f"controller max_factor must be >= 1, got {max_factor!r}")
        if patience < 0:
            raise ConfigError(f"controller patience must be >= 0, got {patience!r}")
        if not 0 <= tolerance < math.inf:
            raise ConfigError(f"controller tolerance must be >= 0, got {tolerance!r}")
        self.step, self.start, self.clip, self.max_factor = float(step), float(start), float(clip), float(max_factor)
        self.margin = float(margin)
        self.patience, self.tolerance = int(patience), float(tolerance)

    def setup(self, log_lambdas: Tensor) -> None:
        self.register_buffer("best", torch.full_like(log_lambdas, torch.finfo(log_lambdas.dtype).max))  # none yet
        self.register_buffer("best_step", torch.zeros_like(log_lambdas, dtype=torch.long))

    def initial_log_lambdas(self, lambda_init: Tensor, multiplier_scale: Tensor) -> Tensor:
        return (lambda_init * self.start * multiplier_scale).log()

    def update(self, log_lambdas: Tensor, signals: Signals) -> tuple[Tensor, Tensor]:
        e = signals.c_ma / signals.value_scale
        proposed = self.integrate(log_lambdas, (e + self.margin).clamp(-1, self.clip), signals)
        proposed = torch.minimum(proposed, (signals.multiplier_scale * self.max_factor).log())
        return self.hold_on_plateau(log_lambdas, proposed, e, signals), self.no_restart(log_lambdas)

    def integrate(self, log_lambdas: Tensor, e: Tensor, signals: Signals) -> Tensor:
        return log_lambdas + self.step * signals.lr * e

    def hold_on_plateau(self, old: Tensor, new: Tensor, e: Tensor, signals: Signals) -> Tensor:
        """Track each component's best ``e`` since it was last satisfied; where it has stalled while
        violated, lambda may fall but not rise. A satisfied component starts the count afresh: a
        constraint that was met and drifts back above kappa is not unreachable."""
        if not self.patience:
            return new
        finite = signals.finite
        satisfied = finite & (e <= 0)
        improved = finite & ~satisfied & (e < self.best - self.tolerance * self.best.abs().clamp(min=1.0))
        none_yet = torch.full_like(self.best, torch.finfo(self.best.dtype).max)
        self.best.copy_(torch.where(satisfied, none_yet, torch.where(improved, e, self.best)))
        self.best_step.copy_(torch.where(satisfied | improved, signals.step, self.best_step))
        return torch.where(self.stalled(e, signals.step), torch.minimum(old, new), new)

    def stalled(self, e: Tensor, step: Tensor) -> Tensor:
        """Violated, with no better ``e`` for ``patience`` updates."""
        return (e > 0) & (step - self.best_step >= self.patience)

    def progress(self, signals: Signals) -> Progress:
        if not self.patience:
            return Progress()
        none = self.best == torch.finfo(self.best.dtype).max
        return Progress(
            unreachable=self.stalled(signals.c_ma / signals.value_scale, signals.step),
            best=torch.where(none, math.nan, self.best * signals.value_scale),
            best_step=torch.where(none, -1, self.best_step),
        )


class Restart(Scaled):
    """:class:`Scaled`, plus a dual restart: the first time a violated component turns satisfied,
    its lambda restarts (Gallego-Posada et al. 2022) and GECO clears the optimiser's state so that
    Adam's step sizes follow (:meth:`GECO.follow`). ``restart_to = "start"`` goes back to
    ``lambda^0``; ``"midway"`` to the geometric mean of ``lambda^0`` and the lambda reached, which
    adapts to how far the climb went. The climb to first satisfaction trains the reconstruction;
    the restart hands the KL back its weight without the frozen optimiser and the slow decay that a
    wound-up multiplier leaves behind."""

    name = "restart"
    restarts = True
    component_buffers = (*Scaled.component_buffers, "violated", "restarted", "log_lambda0")
    RESTART_TO = ("start", "midway")

    def __init__(
        self,
        step: float = 0.05,
        start: float = 1e-3,
        clip: float = 1.0,
        margin: float = 0.0,
        restart_to: str = "midway",
        max_factor: float = 100.0,
        patience: int = 500,
        tolerance: float = 0.01,
    ) -> None:
        super().__init__(step, start, clip, margin, max_factor, patience, tolerance)
        if restart_to not in self.RESTART_TO:
            raise ConfigError(f"controller restart_to must be start or midway, got {restart_to!r}")
        self.restart_to = restart_to

    def setup(self, log_lambdas: Tensor) -> None:
        super().setup(log_lambdas)
        self.register_buffer("violated", torch.zeros_like(log_lambdas, dtype=torch.bool))
        self.register_buffer("restarted", torch.zeros_like(log_lambdas, dtype=torch.bool))
        self.register_buffer("log_lambda0", log_lambdas.clone())

    def update(self, log_lambdas: Tensor, signals: Signals) -> tuple[Tensor, Tensor]:
        new, _ = super().update(log_lambdas, signals)
        finite, c_ma = signals.finite, signals.c_ma
        first = finite & (c_ma <= 0) & self.violated & ~self.restarted
        self.violated.copy_(self.violated | (finite & (c_ma > 0)))
        self.restarted.copy_(self.restarted | first)
        target = self.log_lambda0 if self.restart_to == "start" else (self.log_lambda0 + new) / 2
        return torch.where(first, torch.minimum(new, target), new), first.any()

    def progress(self, signals: Signals) -> Progress:
        return attrs.evolve(super().progress(signals), extra={"restarted": self.restarted})

    def may_restart(self) -> Tensor:
        """Each component restarts once at most: no more once every one has."""
        return ~self.restarted.all()


class NuPI(Scaled):
    """nuPI control of log lambda (Sohrabi et al., ICML 2024; Cooper's ``nuPI``) on the relative
    violation ``e``: ``log lambda^t = log lambda^(t-1) + step * lr * (ki * e^t + kp * (xi^t -
    xi^(t-1)))``, ``xi`` an EMA of ``e`` with coefficient ``nu``, ``xi^(-1) = e^0``. In closed form
    ``log lambda^t = log lambda^0 + step * lr * (ki * sum e + kp * (xi^t - e^0))``: the
    proportional term lowers lambda as soon as the violation shrinks, before the integral has
    unwound."""

    name = "nupi"
    component_buffers = (*Scaled.component_buffers, "xi")

    def __init__(
        self,
        step: float = 0.05,
        kp: float = 5.0,
        ki: float = 1.0,
        nu: float = 0.0,
        start: float = 1e-3,
        clip: float = 1.0,
        margin: float = 0.0,
        max_factor: float = 100.0,
        patience: int = 500,
        tolerance: float = 0.01,
    ) -> None:
        super().__init__(step, start, clip, margin, max_factor, patience, tolerance)
        if kp < 0 or ki < 0 or not 0 <= nu < 1:
            raise ConfigError(f"nupi needs kp >= 0, ki >= 0 and 0 <= nu < 1, got kp={kp}, ki={ki}, nu={nu}")
        self.kp, self.ki, self.nu = float(kp), float(ki), float(nu)

    def setup(self, log_lambdas: Tensor) -> None:
        super().setup(log_lambdas)
        self.register_buffer("xi", torch.zeros_like(log_lambdas))

    def integrate(self, log_lambdas: Tensor, e: Tensor, signals: Signals) -> Tensor:
        previous = torch.where(signals.step == 0, e, self.xi)  # xi^(-1) = e^0
        xi = self.nu * previous + (1 - self.nu) * e
        self.xi.copy_(torch.where(signals.finite, xi, self.xi))
        return log_lambdas + self.step * signals.lr * (self.ki * e + self.kp * (xi - previous))


class Ramp(Controller):
    """Lambda on a fixed schedule, whatever the constraint does (``geco find-kappa``'s ramp), in
    units of the natural scale ``s = multiplier_scale``: from ``start * s`` it climbs by ``rate``
    per update in ``log lambda`` (the ``restart`` controller's climb) to ``high * s``, stays there
    until ``hold`` of the ``steps`` updates are done, then falls exponentially to ``low * s`` by the
    last one: the model learns to reconstruct as a GECO run does whose kappa is out of reach, then
    trades reconstruction for KL on the way down. Pair it with the :class:`NormalisedLagrangian`
    (``GECO(formulation="normalised")``, as the finder does), so that Adam's moments stay valid
    while lambda moves by orders of magnitude."""

    name = "ramp"

    def __init__(
        self,
        steps: int = 1000,
        start: float = 1e-3,
        rate: float = 0.05,
        high: float = 100.0,
        hold: float = 0.5,
        low: float = 3e-3,
    ) -> None:
        super().__init__()
        ordered = 0 < start <= high < math.inf and 0 < low < high
        if steps < 2 or not ordered or not 0 <= hold < 1 or rate <= 0:
            raise ConfigError(
                "ramp needs steps >= 2, 0 < start <= high, 0 < low < high, rate > 0 and 0 <= hold < 1; "
                f"got steps={steps}, start={start}, high={high}, low={low}, rate={rate}, hold={hold}"
            )
        self.steps, self.start, self.rate = int(steps), float(start), float(rate)
        self.high, self.hold, self.low = float(high), float(hold), float(low)

    def factor(self, step: Tensor) -> Tensor:
        """lambda / s after update ``step`` (0-based, a float tensor)."""
        held = int(self.hold * self.steps)
        up = (math.log(self.start) + self.rate * step).clamp(max=math.log(self.high))
        down = ((step - held).clamp(min=0) / max(self.steps - 1 - held, 1)).clamp(max=1)
        return torch.where(step < held, up, math.log(self.high) + down * math.log(self.low / self.high)).exp()

    def initial_log_lambdas(self, lambda_init: Tensor, multiplier_scale: Tensor) -> Tensor:
        return (self.start * multiplier_scale).log()

    def update(self, log_lambdas: Tensor, signals: Signals) -> tuple[Tensor, Tensor]:
        scheduled = (signals.multiplier_scale * self.factor(signals.step.double())).log()
        return scheduled.to(log_lambdas.dtype), self.no_restart(log_lambdas)


@hookimpl
def geco_register_controllers(register):
    for controller in (Paper, Scaled, Restart, NuPI, Ramp):
        register(controller)
