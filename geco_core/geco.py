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

The equivalent beta of a beta-VAE is ``1 / lambda``. KL is in nats per example; each constraint
documents its own units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from geco_core.constraint import Batch, ConstraintLike, component_names
from geco_core.errors import ConfigError, NonFiniteConstraintError

__all__ = ["GECO"]

Scalars = float | Sequence[float]
# |log lambda| stays below this, so lambda and lambda * C stay finite in float32 (exp(80) ~ 5.5e34).
# A guard against overflow to inf (which would turn the loss into NaN), not a modelling bound.
LOG_LAMBDA_LIMIT = 80.0


class GECO(nn.Module):
    """Lagrange multipliers for a stack of constraints, updated as in Algorithm 1.

    Each option's default is the paper's choice.

    Args:
        constraints: the stacked constraints, one multiplier per component, in order.
        alpha: slowness of the moving average ``c_ma`` (paper: 0.99).
        lr: step size on ``log lambda`` (Algorithm 1 only says ``Delta log lambda ∝ C``; default 1).
            A float, or one value per constraint (or per component) to rescale constraints whose
            values live on different scales.
        lambda_init: initial multiplier(s), > 0 (paper: 1).
        lambda_min, lambda_max: optional bounds on lambda, applied after each update (paper: none).
            Without them ``log lambda`` is still kept within +-80, so that lambda never overflows
            float32 to inf (which would turn the loss into NaN).
        ma_init: first value of the moving average. ``None`` (paper) starts it at the first batch's
            ``c_hat``; a number starts from that value, so ``c_ma^0 = alpha*ma_init + (1-alpha)*c_hat^0``.
        warmup: number of updates during which lambda stays fixed while ``c_ma`` already moves
            (paper: 0).
        strict: raise :class:`NonFiniteConstraintError` on a non-finite ``c_hat`` instead of skipping
            that update (paper: silent; skipping is counted in ``skipped`` and reported).
        sync: under ``torch.distributed``, average ``c_hat`` over all processes before the moving
            average, so every process holds the same multipliers.
        dtype: of the buffers (float32; float64 for exact comparisons). Constraint values are cast
            to it, so bf16 constraints still feed a float32 moving average.

    Buffers (in ``state_dict``, moved by ``.to``): ``log_lambdas``, ``c_ma``, ``c_hat`` (last batch),
    ``step`` (updates applied) and ``skipped`` (updates refused for a non-finite ``c_hat``). They
    change only in training mode.
    """

    def __init__(
        self,
        constraints: Sequence[ConstraintLike],
        *,
        alpha: float = 0.99,
        lr: Scalars = 1.0,
        lambda_init: Scalars = 1.0,
        lambda_min: float | None = None,
        lambda_max: float | None = None,
        ma_init: float | None = None,
        warmup: int = 0,
        strict: bool = False,
        sync: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not constraints:
            raise ConfigError("GECO needs at least one constraint")
        for c in constraints:
            if not isinstance(c, ConstraintLike) or not isinstance(c.dim, int) or c.dim < 1:
                raise ConfigError(f"not a constraint (needs name, dim >= 1 and a call): {c!r}")
        if not 0.0 <= alpha < 1.0:
            raise ConfigError(f"alpha must be in [0, 1), got {alpha}")
        if warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {warmup}")
        if lambda_min is not None and lambda_min <= 0:
            raise ConfigError(f"lambda_min must be > 0, got {lambda_min}")
        if lambda_min is not None and lambda_max is not None and lambda_max < lambda_min:
            raise ConfigError(f"lambda_max ({lambda_max}) must be >= lambda_min ({lambda_min})")

        modules = [c for c in constraints if isinstance(c, nn.Module)]
        self.constraints = nn.ModuleList(modules)
        self._constraints = list(constraints)  # in order, modules or plain callables
        self.dims = [int(c.dim) for c in constraints]
        self.component_names = _unique([n for c in constraints for n in component_names(c)])
        self.alpha = float(alpha)
        self.ma_init = ma_init
        self.warmup = int(warmup)
        self.strict = strict
        self.sync = sync
        self.log_lambda_min = -LOG_LAMBDA_LIMIT if lambda_min is None else math.log(lambda_min)
        self.log_lambda_max = LOG_LAMBDA_LIMIT if lambda_max is None else math.log(lambda_max)

        lambda0 = self._per_component("lambda_init", lambda_init, dtype)
        if (lambda0 <= 0).any():
            raise ConfigError(f"lambda_init must be > 0, got {lambda_init}")
        log_lambda0 = lambda0.log().clamp(self.log_lambda_min, self.log_lambda_max)
        self.register_buffer("lr", self._per_component("lr", lr, dtype), persistent=False)
        self.register_buffer("log_lambdas", log_lambda0)
        self.register_buffer("c_ma", torch.full_like(lambda0, 0.0 if ma_init is None else ma_init))
        self.register_buffer("c_hat", torch.zeros_like(lambda0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))

    @property
    def num_components(self) -> int:
        """L, the length of the constraint vector."""
        return sum(self.dims)

    @property
    def lambdas(self) -> Tensor:
        """The Lagrange multipliers, ``exp(log_lambdas)`` (L,)."""
        return self.log_lambdas.exp()

    def evaluate(self, batch: Batch) -> Tensor:
        """Per-example values of every constraint, stacked in order: ``(B, L)``."""
        values = []
        for c, dim in zip(self._constraints, self.dims):
            v = c(batch)
            if v.ndim != 2 or v.shape[1] != dim:
                raise ValueError(f"constraint {c.name!r} returned shape {tuple(v.shape)}, expected (batch, {dim})")
            values.append(v)
        return torch.cat(values, dim=1)

    def forward(self, kl: Tensor, batch: Batch) -> Tensor:
        """``mean(kl) + lambda . C`` for this batch; in training mode also one step of Algorithm 1."""
        return self.lagrangian(kl, self.evaluate(batch))

    def lagrangian(self, kl: Tensor, values: Tensor) -> Tensor:
        """The loss of Algorithm 1 from per-example KL ``(B,)`` (nats) and constraint values ``(B, L)``.

        In training mode this updates ``c_ma`` and ``log_lambdas`` (the loss uses lambda from before
        the update). In eval mode it returns ``mean(kl) + lambda . c_hat`` and changes nothing.
        """
        if values.ndim != 2 or values.shape[1] != self.num_components:
            raise ValueError(
                f"constraint values must have shape (batch, {self.num_components}), got {tuple(values.shape)}"
            )
        c_hat = values.mean(dim=0)
        lambdas = self.lambdas.to(c_hat.dtype)  # lambda^(t-1): a fresh tensor, safe to update after
        if not self.training:
            return kl.mean() + (lambdas * c_hat).sum()
        c_ma = self._update(c_hat.detach(), values.shape[0]).to(c_hat.dtype)
        c = c_hat + (c_ma - c_hat).detach()
        return kl.mean() + (lambdas * c).sum()

    @torch.no_grad()
    def _update(self, c_hat: Tensor, n: int) -> Tensor:
        """Moving average and multiplier update; returns the new ``c_ma``. Free of host syncs unless
        ``strict``: a non-finite ``c_hat`` leaves every buffer but ``c_hat`` and ``skipped`` as is."""
        c_hat = self._all_processes_mean(c_hat.to(self.c_ma.dtype), n)
        finite = torch.isfinite(c_hat).all()
        if self.strict and not finite:
            raise NonFiniteConstraintError(
                f"non-finite constraint value at step {int(self.step)}: "
                + ", ".join(f"{k}={v:g}" for k, v in zip(self.component_names, c_hat.tolist()))
            )
        blended = self.alpha * self.c_ma + (1.0 - self.alpha) * c_hat
        c_ma = blended if self.ma_init is not None else torch.where(self.step == 0, c_hat, blended)
        log_lambdas = (self.log_lambdas + self.lr * c_ma).clamp(self.log_lambda_min, self.log_lambda_max)
        if self.warmup:
            log_lambdas = torch.where(self.step >= self.warmup, log_lambdas, self.log_lambdas)
        self.c_ma.copy_(torch.where(finite, c_ma, self.c_ma))
        self.log_lambdas.copy_(torch.where(finite, log_lambdas, self.log_lambdas))
        self.c_hat.copy_(c_hat)
        self.step.add_(finite.long())
        self.skipped.add_((~finite).long())
        return self.c_ma.clone()

    def _all_processes_mean(self, c_hat: Tensor, n: int) -> Tensor:
        """Exact mean over every process's examples: all-reduce of (n * c_hat, n)."""
        if not (self.sync and dist.is_available() and dist.is_initialized()):
            return c_hat
        if dist.get_world_size() == 1:
            return c_hat
        total = torch.cat([c_hat * n, c_hat.new_tensor([float(n)])])
        dist.all_reduce(total)
        return total[:-1] / total[-1]

    def report(self) -> dict[str, float]:
        """Last step, per component ``name``: ``name/c_hat``, ``name/c_ma``, ``name/lambda`` and
        ``name/beta`` (= 1/lambda); plus ``geco/step`` and ``geco/skipped``."""
        rows = torch.stack([self.c_hat, self.c_ma, self.lambdas, self.lambdas.reciprocal()]).tolist()
        out: dict[str, float] = {}
        for j, name in enumerate(self.component_names):
            for key, row in zip(("c_hat", "c_ma", "lambda", "beta"), rows):
                out[f"{name}/{key}"] = row[j]
        out["geco/step"] = float(self.step)
        out["geco/skipped"] = float(self.skipped)
        return out

    def satisfied(self) -> Tensor:
        """Boolean ``(L,)``: the moving average of each component is ``<= 0``."""
        return self.c_ma <= 0

    def _per_component(self, key: str, value: Scalars, dtype: torch.dtype) -> Tensor:
        """Expand a float, one value per constraint, or one per component, to an ``(L,)`` tensor."""
        if isinstance(value, int | float):
            return torch.full((self.num_components,), float(value), dtype=dtype)
        values = [float(v) for v in value]
        if len(values) == len(self.dims):
            return torch.tensor([v for v, d in zip(values, self.dims) for _ in range(d)], dtype=dtype)
        if len(values) == self.num_components:
            return torch.tensor(values, dtype=dtype)
        raise ConfigError(
            f"{key} needs one value, one per constraint ({len(self.dims)}) or one per component "
            f"({self.num_components}); got {len(values)}"
        )

    def extra_repr(self) -> str:
        return f"components={self.component_names}, alpha={self.alpha}, warmup={self.warmup}"


def _unique(names: list[str]) -> list[str]:
    """Suffix repeated component names (two stacked ``re`` become ``re`` and ``re#2``)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
