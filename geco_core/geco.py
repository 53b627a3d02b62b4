"""GECO: Algorithm 1 of Rezende & Viola (2018), "Generalized ELBO with Constrained Optimization".

Minimise the KL subject to expectation constraints stated in data space::

    min  E[KL(q(z|x) || p(z))]   s.t.   E[C(x, g(z))] <= 0,      C in R^L
    Lagrangian   L_lambda = E[KL] + lambda^T E[C]

One training step t of Algorithm 1, as :meth:`GECO.lagrangian` computes it::

    c_hat^t  = batch mean of the stacked constraint values                     (L,)
    c_ma^t   = c_hat^0                                   if t = 0
             = alpha * c_ma^(t-1) + (1 - alpha) * c_hat^t   otherwise
    C^t      = c_hat^t + stopgrad(c_ma^t - c_hat^t)      value c_ma^t, gradient of c_hat^t
    loss     = mean KL + lambda^(t-1) . C^t              lambda from the previous step
    log lambda^t = log lambda^(t-1) + lr * c_ma^t        so lambda > 0; it grows while violated

The last two lines are the ``paper`` multiplier controller; other controllers
(:mod:`geco_core.controllers`) change how lambda starts and moves and how the loss is scaled, and
may restart lambda, which :meth:`GECO.follow` passes on to the optimiser.

The equivalent beta of a beta-VAE is ``1 / lambda``. KL is in nats per example; each constraint
documents its own units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from geco_core.constraint import CONFIDENCE, Batch, ConstraintLike, ConstraintStack
from geco_core.controllers import DEFAULT, Controller, Formulation, Signals, build_formulation
from geco_core.errors import ConfigError, NonFiniteConstraintError
from geco_core.optim import scale_optimizer_state
from geco_core.plugins import create
from geco_core.state import GecoState, snapshot

__all__ = ["GECO", "LOG_LAMBDA_LIMIT", "build_controller"]

Scalars = float | Sequence[float]
# |log lambda| stays below this: lambda in [1e-12, 1e12]. Then lambda * C stays finite in float32 for
# any |C| < 3e26, and Adam's second moment (lambda * grad C)^2 for any |grad C| < 1.8e7, so neither
# the loss nor the optimiser state can overflow. A guard, not a modelling bound (lambda_max is that).
LOG_LAMBDA_LIMIT = 12 * math.log(10)
STATE_FORMAT = 2  # version of the extra state (component names) in ``state_dict``


class GECO(nn.Module):
    """Lagrange multipliers for a stack of constraints, updated as in Algorithm 1.

    Each option's default is the paper's choice, except the multiplier controller: the default
    (``restart``) is the one that keeps GECO's promise across the shipped configs
    (``benchmarks/multipliers.py``); ``controller="paper"`` is Algorithm 1 exactly.

    Args:
        constraints: the stacked constraints (:class:`~geco_core.constraint.ConstraintLike`), one
            multiplier per component, in order.
        alpha: slowness of the moving average ``c_ma`` (paper: 0.99).
        controller: how lambda starts and moves: a registered name (``"restart"``, the default;
            ``"paper"``, Algorithm 1 exactly; ``geco controllers`` lists them), a
            ``{"name": ..., **options}`` mapping, or a :class:`~geco_core.controllers.Controller`.
        formulation: how lambda weighs the loss, chosen apart from the controller:
            ``"lagrangian"`` (Algorithm 1, ``KL + lambda . C``) or ``"normalised"`` (divided by
            ``1 + sum lambda / s``, :class:`~geco_core.controllers.NormalisedLagrangian`).
        lr: step size on ``log lambda`` (Algorithm 1 only says ``Delta log lambda ∝ C``; default 1).
            A float, or one value per constraint (or per component).
        lambda_init: initial multiplier(s), > 0 (paper: 1); controllers that start from the
            constraints' natural scale multiply it by ``multiplier_scale``.
        lambda_min, lambda_max: optional bounds on lambda, applied after each update (paper: none).
            Without them lambda is still kept within [1e-12, 1e12] (:data:`LOG_LAMBDA_LIMIT`).
        ma_init: first value of the moving average. ``None`` (paper) starts it at the first batch's
            ``c_hat``; a number starts from that value, so ``c_ma^0 = alpha*ma_init + (1-alpha)*c_hat^0``.
        warmup: number of updates during which lambda stays fixed while ``c_ma`` already moves.
        validation_confidence: standard errors in :meth:`validate`'s bound, for constraints declaring none.
        strict: raise :class:`NonFiniteConstraintError` on a non-finite ``c_hat`` instead of skipping
            that update (skipping is counted in ``skipped`` and reported).
        sync: under ``torch.distributed``, average ``c_hat`` over all processes before the moving
            average, so every process holds the same multipliers.
        dtype: of the buffers (float32; float64 for exact comparisons). Constraint values are cast
            to it, so bf16 constraints still feed a float32 moving average.

    Buffers (in ``state_dict``, moved by ``.to``, changed only in training mode): ``log_lambdas``,
    ``c_ma``, ``c_hat`` (last batch), ``gap``, ``step`` (updates applied), ``skipped`` (updates refused
    for a non-finite ``c_hat``), the controller's own; matched by component name when loaded.
    """

    def __init__(
        self,
        constraints: Sequence[ConstraintLike],
        *,
        alpha: float = 0.99,
        controller: str | Mapping[str, Any] | nn.Module = DEFAULT,
        formulation: str | Formulation = "lagrangian",
        lr: Scalars = 1.0,
        lambda_init: Scalars = 1.0,
        lambda_min: float | None = None,
        lambda_max: float | None = None,
        ma_init: float | None = None,
        warmup: int = 0,
        validation_confidence: float = CONFIDENCE,
        strict: bool = False,
        sync: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.stack = ConstraintStack(constraints)
        self.log_lambda_min, self.log_lambda_max = _checked_options(alpha, warmup, lambda_min, lambda_max)
        self.constraints = nn.ModuleList([c for c in constraints if isinstance(c, nn.Module)])  # moved by .to
        self.dims, self.component_names = self.stack.dims, self.stack.component_names
        self.num_components = sum(self.dims)  # L, the length of the constraint vector
        self.alpha, self.ma_init, self.warmup, self.strict, self.sync = float(alpha), ma_init, int(warmup), strict, sync
        options = _component_options(constraints, self.dims, lr, lambda_init, validation_confidence, dtype)
        lambda0 = options.pop("lambda_init")
        for name, value in options.items():  # lr, multiplier_scale, value_scale, confidence
            self.register_buffer(name, value, persistent=False)
        self.controller = build_controller(controller)
        self.formulation = build_formulation(formulation)
        log_lambda0 = self.controller.initial_log_lambdas(lambda0, self.multiplier_scale)
        log_lambda0 = log_lambda0.clamp(self.log_lambda_min, self.log_lambda_max)
        self.register_buffer("log_lambdas", log_lambda0)
        self.register_buffer("c_ma", torch.full_like(lambda0, 0.0 if ma_init is None else ma_init))
        self.register_buffer("c_hat", torch.zeros_like(lambda0))
        self.register_buffer("gap", torch.zeros_like(lambda0))
        self.register_buffer("validated", torch.zeros((), dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))
        self.register_buffer("_keep", torch.ones(()), persistent=False)  # 0 after a step that restarted lambda
        self.controller.setup(log_lambda0)
        #: whether the controller can still restart lambda, as the host last knew it (:meth:`state`)
        self.may_restart = self.controller.restarts

    @property
    def restarted(self) -> Tensor:
        """Scalar bool: whether the last step restarted a multiplier (:meth:`follow` then resets)."""
        return self._keep == 0

    @property
    def lambdas(self) -> Tensor:
        """The Lagrange multipliers, ``exp(log_lambdas)`` (L,)."""
        return self.log_lambdas.exp()

    def evaluate(self, batch: Batch) -> Tensor:
        """Per-example values of every constraint, stacked in order: ``(B, L)``."""
        return self.stack.evaluate(batch)

    def forward(self, kl: Tensor, batch: Batch) -> Tensor:
        """The loss for this batch (:meth:`lagrangian`); in training mode also one step of Algorithm 1."""
        return self.lagrangian(kl, self.evaluate(batch))

    def lagrangian(self, kl: Tensor, values: Tensor) -> Tensor:
        """The loss of Algorithm 1 from per-example KL ``(B,)`` (nats) and constraint values ``(B, L)``.

        In training mode this updates ``c_ma`` and ``log_lambdas`` (the loss uses lambda from before
        the update). In eval mode it uses ``c_hat`` in place of ``C`` and changes nothing. A batch
        whose constraint values are not finite changes no multiplier and gives a non-finite loss:
        skip the optimiser step on it (:func:`~geco_core.optim.step_if_finite`, which the trainer
        uses too, decides on the device; ``if torch.isfinite(loss)`` does it with a host sync)."""
        if values.ndim != 2 or values.shape[1] != self.num_components:
            raise ValueError(
                f"constraint values must have shape (batch, {self.num_components}), got {tuple(values.shape)}"
            )
        c_hat = values.mean(dim=0)
        lambdas = self.lambdas.to(c_hat.dtype)  # lambda^(t-1): a fresh tensor, safe to update after
        if self.training:
            c_ma = self._update(c_hat.detach(), values.shape[0]).to(c_hat.dtype)
            c_hat = c_hat + (c_ma - c_hat).detach()  # C: the value of c_ma, the gradient of c_hat
        return self.formulation(kl.mean(), lambdas, c_hat, self.multiplier_scale)

    @torch.no_grad()
    def _update(self, c_hat: Tensor, n: int) -> Tensor:
        """Moving average and multiplier update; returns the new ``c_ma``. Free of host syncs unless
        ``strict`` or the controller needs one: a non-finite ``c_hat`` leaves every buffer but
        ``c_hat`` and ``skipped`` as it is."""
        c_hat = _mean_over_processes(c_hat.to(self.c_ma.dtype), n, self.sync)
        finite = torch.isfinite(c_hat).all()
        if self.strict and not finite:
            values = ", ".join(f"{k}={v:g}" for k, v in zip(self.component_names, c_hat.tolist()))
            raise NonFiniteConstraintError(f"non-finite constraint value at step {int(self.step)}: {values}")
        safe = torch.where(finite, c_hat, self.c_ma)  # keeps NaN out of every later computation
        blended = self.alpha * self.c_ma + (1.0 - self.alpha) * safe
        c_ma = blended if self.ma_init is not None else torch.where(self.step == 0, safe, blended)
        log_lambdas, restarted = self.controller.update(self.log_lambdas, self._signals(c_ma + self.gap, finite))
        log_lambdas = log_lambdas.clamp(self.log_lambda_min, self.log_lambda_max)
        if self.warmup:
            log_lambdas = torch.where(self.step >= self.warmup, log_lambdas, self.log_lambdas)
        self.c_ma.copy_(torch.where(finite, c_ma, self.c_ma))
        self.log_lambdas.copy_(torch.where(finite, log_lambdas, self.log_lambdas))
        self._keep.copy_(~(finite & restarted))
        self.c_hat.copy_(c_hat)
        self.step.add_(finite.long())
        self.skipped.add_((~finite).long())
        return self.c_ma.clone()

    @torch.no_grad()
    def validate(self, values: Tensor) -> None:
        """Tell GECO the constraint values ``(n, L)`` of this process's validation examples (never
        trained on), measured now; under ``torch.distributed`` every process's examples count.

        GECO keeps the generalisation gap ``gap = bound - c_ma``, ``bound`` the validation mean plus
        ``validation_confidence`` standard errors (the constraint's, else GECO's), the first
        measurement as it is, then the mean of each new one with the gap so far; the controller
        drives ``c_ma + gap`` to ``<= 0``, so held-out data meets kappa. Non-finite ones are ignored."""
        bound = _upper_bound(values.detach().to(self.c_ma.dtype), self.confidence, self.sync)
        gap = bound - self.c_ma
        finite = torch.isfinite(gap).all()
        blended = torch.where(self.validated, (self.gap + gap) / 2, gap)
        self.gap.copy_(torch.where(finite, blended, self.gap))
        self.validated.copy_(self.validated | finite)

    def _signals(self, c_ma: Tensor, finite: Tensor) -> Signals:
        return Signals(c_ma, self.step, finite, self.lr, self.multiplier_scale, self.value_scale)

    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer`` follow a restart of lambda; call it after every ``optimizer.step()``.
        Where the controller restarted a multiplier in this step, the optimiser's state is multiplied
        by 0 on the device (Adam starts afresh as after ``state.clear()``, without a host sync); free
        for controllers that never restart or no longer can (``may_restart``, as :meth:`state` read it)."""
        if self.controller.restarts and self.may_restart:
            scale_optimizer_state(optimizer, self._keep)

    def state(self) -> GecoState:
        """The multipliers after the last step: one typed record per component (name, kappa,
        ``c_hat``, ``c_ma``, lambda, beta, the value reached in kappa's units, status, best value and
        step, the controller's own; :class:`~geco_core.state.ComponentState`). One host sync."""
        signals = self._signals(self.target, self.step.new_ones((), dtype=torch.bool))
        record, may_restart = snapshot(self, self.controller.progress(signals), self.controller.may_restart())
        self.may_restart = self.controller.restarts and may_restart
        return record

    @property
    def target(self) -> Tensor:
        """``(L,)``: what the controller drives to ``<= 0``, each component's moving average plus
        its generalisation gap (:meth:`validate`)."""
        return self.c_ma + self.gap

    def get_extra_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "components": list(self.component_names)}

    def set_extra_state(self, state: Any) -> None:
        pass  # read (and acted on) in _load_from_state_dict, before the buffers are loaded

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        _match_components(self, state_dict, prefix)  # before the buffers are loaded
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"components={_short(self.component_names)}, alpha={self.alpha}, warmup={self.warmup}"


def _component_options(
    constraints: Sequence[ConstraintLike],
    dims: Sequence[int],
    lr: Scalars,
    lambda_init: Scalars,
    confidence: float,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """GECO's per-component options as ``(L,)`` tensors, each checked (a ConfigError naming one out
    of range): ``lr`` and ``lambda_init`` as given, each constraint's ``multiplier_scale``,
    ``value_scale`` and ``validation_confidence`` (``confidence`` where it declares none)."""
    given = {"lr": lr, "lambda_init": lambda_init}
    options = {key: _per_component(key, value, dims, dtype) for key, value in given.items()}
    for key, value in options.items():
        if not ((value > 0) & torch.isfinite(value)).all():
            raise ConfigError(f"{key} must be > 0 and finite, got {given[key]}")
    for c in constraints:
        pair = (float(c.multiplier_scale), float(c.value_scale))
        if not all(0 < s < math.inf for s in pair):
            raise ConfigError(f"constraint {c.name!r}: multiplier_scale and value_scale must be > 0, got {pair}")
    declared = [getattr(c, "validation_confidence", None) for c in constraints]
    z = [float(confidence if d is None else d) for d in declared]
    if not all(0 <= v < math.inf for v in z):
        raise ConfigError(f"validation_confidence must be >= 0 and finite, got {z}")
    options["multiplier_scale"] = _expand([float(c.multiplier_scale) for c in constraints], dims, dtype)
    options["value_scale"] = _expand([float(c.value_scale) for c in constraints], dims, dtype)
    options["confidence"] = _expand(z, dims, dtype)
    return options


def _synced(sync: bool) -> bool:
    return sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_over_processes(total: Tensor, sync: bool) -> Tensor:
    """``total`` summed over every process under ``torch.distributed`` with ``sync`` (else itself)."""
    if _synced(sync):
        dist.all_reduce(total)
    return total


def _mean_over_processes(c_hat: Tensor, n: int, sync: bool) -> Tensor:
    """Exact mean over every process's ``n`` examples: all-reduce of ``(n * c_hat, n)``."""
    if not _synced(sync):
        return c_hat
    total = _sum_over_processes(torch.cat([c_hat * n, c_hat.new_tensor([float(n)])]), sync)
    return total[:-1] / total[-1]


def _upper_bound(values: Tensor, confidence: Tensor, sync: bool) -> Tensor:
    """``(L,)``: the mean of ``values`` ``(n, L)`` (every process's, with ``sync``) plus
    ``confidence`` standard errors, ``mean + z * sqrt(var / n)``, var the unbiased variance."""
    L = values.shape[1]
    stats = _sum_over_processes(
        torch.cat([values.sum(0), values.square().sum(0), values.new_tensor([len(values)])]), sync
    )
    n = stats[-1].clamp(min=2)
    mean = stats[:L] / n
    variance = (stats[L:-1] / n - mean.square()).clamp(min=0) * n / (n - 1)
    return mean + confidence * (variance / n).sqrt()


def _per_component(key: str, value: Scalars, dims: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Expand a float, one value per constraint (of ``dims`` components each), or one per
    component, to an ``(L,)`` tensor."""
    if isinstance(value, int | float):
        return torch.full((sum(dims),), float(value), dtype=dtype)
    values = [float(v) for v in value]
    if len(values) == len(dims):
        return _expand(values, dims, dtype)
    if len(values) == sum(dims):
        return torch.tensor(values, dtype=dtype)
    raise ConfigError(
        f"{key} needs one value, one per constraint ({len(dims)}) or one per component ({sum(dims)}); got {len(values)}"
    )


def _expand(per_constraint: Sequence[float], dims: Sequence[int], dtype: torch.dtype) -> Tensor:
    return torch.tensor([v for v, d in zip(per_constraint, dims) for _ in range(d)], dtype=dtype)


def _checked_options(
    alpha: float, warmup: int, lambda_min: float | None, lambda_max: float | None
) -> tuple[float, float]:
    """GECO's scalar options checked (a ConfigError naming one out of range), and the bounds of
    ``log lambda`` they give: ``lambda_min``/``lambda_max`` within +-:data:`LOG_LAMBDA_LIMIT`."""
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"alpha must be in [0, 1), got {alpha}")
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")
    for key, bound in (("lambda_min", lambda_min), ("lambda_max", lambda_max)):
        if bound is not None and not 0 < bound < math.inf:
            raise ConfigError(f"{key} must be > 0 and finite, got {bound}")
    if lambda_min is not None and lambda_max is not None and lambda_max < lambda_min:
        raise ConfigError(f"lambda_max ({lambda_max}) must be >= lambda_min ({lambda_min})")
    low = -LOG_LAMBDA_LIMIT if lambda_min is None else max(math.log(lambda_min), -LOG_LAMBDA_LIMIT)
    high = LOG_LAMBDA_LIMIT if lambda_max is None else min(math.log(lambda_max), LOG_LAMBDA_LIMIT)
    return low, high


def _match_components(geco: GECO, state_dict: dict[str, Any], prefix: str) -> None:
    """Reorder the per-component entries of a saved state (GECO's buffers and the controller's
    ``component_buffers``), whose extra state names its components, to ``geco``'s order; a
    ConfigError where the two stacks differ. A state from before validation gets no gap; one from
    geco 0.1.0 (no names) is taken by position."""
    for key in ("gap", "validated"):
        state_dict.setdefault(prefix + key, getattr(geco, key).new_zeros(getattr(geco, key).shape))
    extra = state_dict[prefix + "_extra_state"] = state_dict.get(prefix + "_extra_state") or geco.get_extra_state()
    saved, mine = extra.get("components") if isinstance(extra, dict) else None, list(geco.component_names)
    if saved is None or list(saved) == mine:
        return
    if sorted(saved) != sorted(mine):
        raise ConfigError(
            f"GECO state holds the components {_short(saved)}, this GECO has {_short(mine)}: "
            "multipliers are matched by name, so the stacks must hold the same components"
        )
    order = torch.tensor([list(saved).index(n) for n in mine])
    keys = [prefix + k for k in ("log_lambdas", "c_ma", "c_hat", "gap")]
    for key in keys + [f"{prefix}controller.{k}" for k in geco.controller.component_buffers]:
        if key in state_dict:
            state_dict[key] = state_dict[key][order]


def _short(names: Sequence[str], limit: int = 6) -> str:
    """``[a, b, c]``, or the first ``limit`` names and how many more."""
    shown = ", ".join(names[:limit])
    return f"[{shown}]" if len(names) <= limit else f"[{shown}, ... {len(names) - limit} more]"


def build_controller(spec: str | Mapping[str, Any] | Controller | None) -> Controller:
    """A controller from a registered name, a ``{"name": ..., **options}`` mapping, or itself."""
    if isinstance(spec, Controller):
        return spec
    if spec is None:
        spec = DEFAULT
    if isinstance(spec, str):
        return create("controller", spec)
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"controller needs a name, e.g. {{ name = {DEFAULT!r} }}; got {dict(spec)!r}")
        return create("controller", name, **options)
    raise ConfigError(f"controller must be a name, a table with a name, or a Controller; got {spec!r}")
