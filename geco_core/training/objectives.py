"""The training objectives, registered like constraints (``geco objectives`` lists them), one
interface for all: ``objective(out, batch, step) -> loss`` every step, and
``objective.metrics(out, batch, step) -> dict`` on the steps that log.

=================  =============================================  ==============================
name               loss per example (nats)                        beta reported
=================  =============================================  ==============================
``elbo``           NLL + KL                                       1
``beta``           NLL + beta * KL                                beta
``annealed-beta``  NLL + beta(step) * KL, beta linear start->end  beta(step) (paper: 2.0 -> 0.7)
``geco``           KL + lambda . C   (Algorithm 1, :class:`GECO`)  1 / lambda per component
=================  =============================================  ==============================

NLL is the negative log-likelihood of the pixels under the decoder: a Gaussian with one global,
learned standard deviation sigma (``0.5 * sum((x - x_hat)^2 / sigma^2 + log(2 pi sigma^2))``), or a
Bernoulli on the decoder logits. Losses are batch means of these per-example sums.

An objective's constructor arguments are its config options (``[objective.<name>]``); one that
enforces constraints sets ``constrained = True`` and takes the built constraints as ``constraints``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geco_core.constraint import CONFIDENCE, Batch, ConstraintLike
from geco_core.controllers import DEFAULT
from geco_core.data.base import DataBatch
from geco_core.errors import ConfigError
from geco_core.geco import GECO
from geco_core.hookspecs import hookimpl
from geco_core.models.base import Output

__all__ = ["Objective", "Likelihood", "ELBO", "Beta", "AnnealedBeta", "GecoObjective", "constraint_batch"]

Metrics = dict[str, Tensor]
LIKELIHOODS = ("gaussian", "bernoulli")


def constraint_batch(out: Output, batch: DataBatch) -> Batch:
    """What the constraints see of a model's output on a data batch."""
    return Batch(x=batch.x, x_hat=out.x_hat, labels=batch.labels, context=batch.context, index=batch.index)


class Likelihood(nn.Module):
    """p(x|z): ``gaussian`` with a global sigma (learned unless ``learn_sigma=False``) or ``bernoulli``."""

    def __init__(self, kind: str = "gaussian", sigma: float = 0.1, learn_sigma: bool = True) -> None:
        super().__init__()
        if kind not in LIKELIHOODS:
            raise ConfigError(f"objective.likelihood must be gaussian or bernoulli, got {kind!r}")
        if not 0 < sigma < math.inf:
            raise ConfigError(f"objective.sigma must be > 0, got {sigma!r}")
        self.kind = kind
        learned = learn_sigma and kind == "gaussian"  # a Bernoulli has no sigma to learn
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)), requires_grad=learned)

    def nll(self, out: Output, x: Tensor) -> Tensor:
        """Per-example negative log-likelihood in nats, summed over pixels: ``(B,)``."""
        if self.kind == "bernoulli":
            return F.binary_cross_entropy_with_logits(out.logits, x, reduction="none").flatten(1).sum(1)
        log_sigma = self.log_sigma.to(x.dtype)
        sq = (x - out.x_hat).square().flatten(1)
        return 0.5 * (sq * torch.exp(-2 * log_sigma) + 2 * log_sigma + math.log(2 * math.pi)).sum(1)


class Objective(nn.Module):
    """``forward(out, batch, step) -> loss`` (a scalar, nats per example); ``metrics(out, batch,
    step)`` -> detached scalar tensors, called only on the steps that log. Objectives that enforce
    constraints set ``constrained`` and hold their :class:`GECO` as ``geco``."""

    name: ClassVar[str] = ""
    constrained: ClassVar[bool] = False

    @property
    def geco(self) -> GECO | None:
        """The multipliers of an objective that enforces constraints (its submodule ``geco``)."""
        return self._modules.get("geco")

    def metrics(self, out: Output, batch: DataBatch, step: int) -> Metrics:
        """What every objective reports, as batch means (so that means over processes are exact):
        the KL (nats/example) and the mean squared pixel error ``mse`` (the loop logs its root)."""
        return {
            "kl": out.kl.detach().mean(),
            "mse": (batch.x - out.x_hat.detach()).square().mean(),
        }


class ELBO(Objective):
    """Maximise the ELBO: minimise NLL + KL (nats per example)."""

    name = "elbo"

    def __init__(self, likelihood: str = "gaussian", sigma: float = 0.1, learn_sigma: bool = True) -> None:
        super().__init__()
        self.likelihood = Likelihood(likelihood, sigma, learn_sigma)

    def beta(self, step: int) -> float:
        return 1.0

    def forward(self, out: Output, batch: DataBatch, step: int) -> Tensor:
        return (self.likelihood.nll(out, batch.x) + self.beta(step) * out.kl).mean()

    def metrics(self, out: Output, batch: DataBatch, step: int) -> Metrics:
        m = super().metrics(out, batch, step)
        with torch.no_grad():
            m["nll"] = self.likelihood.nll(out, batch.x).mean()
        m["beta"] = torch.tensor(self.beta(step))
        if self.likelihood.kind == "gaussian":
            m["sigma"] = self.likelihood.log_sigma.detach().exp()
        return m


class Beta(ELBO):
    """beta-VAE: minimise NLL + beta * KL with a fixed beta > 0."""

    name = "beta"

    def __init__(
        self, beta: float = 1.0, likelihood: str = "gaussian", sigma: float = 0.1, learn_sigma: bool = True
    ) -> None:
        super().__init__(likelihood, sigma, learn_sigma)
        if not 0 < beta < math.inf:
            raise ConfigError(f"objective.beta must be > 0, got {beta!r}")
        self._beta = float(beta)

    def beta(self, step: int) -> float:
        return self._beta


class AnnealedBeta(ELBO):
    """The paper's hand-annealed baseline: NLL + beta(step) * KL, beta moving linearly from
    ``beta_start`` to ``beta_end`` over ``anneal_steps`` steps, then constant (paper: 2.0 -> 0.7)."""

    name = "annealed-beta"

    def __init__(
        self,
        beta_start: float = 2.0,
        beta_end: float = 0.7,
        anneal_steps: int = 10_000,
        likelihood: str = "gaussian",
        sigma: float = 0.1,
        learn_sigma: bool = True,
    ) -> None:
        super().__init__(likelihood, sigma, learn_sigma)
        if not (0 < beta_start < math.inf and 0 < beta_end < math.inf):
            raise ConfigError(f"objective.beta_start and beta_end must be > 0, got {beta_start}, {beta_end}")
        if anneal_steps < 1:
            raise ConfigError(f"objective.anneal_steps must be >= 1, got {anneal_steps}")
        self.beta_start, self.beta_end, self.anneal_steps = float(beta_start), float(beta_end), int(anneal_steps)

    def beta(self, step: int) -> float:
        f = min(step / self.anneal_steps, 1.0)
        return self.beta_start + f * (self.beta_end - self.beta_start)


class GecoObjective(Objective):
    """GECO: minimise KL + lambda . C over the stacked constraints (Algorithm 1, :class:`GECO`).

    Every option is :class:`GECO`'s; ``lr`` and ``lambda_init`` may be given per constraint
    (``[[constraints]] lr = ...``), which the trainer passes as lists."""

    name = "geco"
    constrained = True

    def __init__(
        self,
        constraints: Sequence[ConstraintLike],
        alpha: float = 0.99,
        controller: str | dict = DEFAULT,
        formulation: str = "lagrangian",
        lr: float | Sequence[float] = 1.0,
        lambda_init: float | Sequence[float] = 1.0,
        lambda_min: float | None = None,
        lambda_max: float | None = None,
        ma_init: float | None = None,
        warmup: int = 0,
        validation_confidence: float = CONFIDENCE,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.geco = GECO(
            constraints,
            alpha=alpha,
            controller=controller,
            formulation=formulation,
            lr=lr,
            lambda_init=lambda_init,
            lambda_min=lambda_min,
            lambda_max=lambda_max,
            ma_init=ma_init,
            warmup=warmup,
            validation_confidence=validation_confidence,
            strict=strict,
        )

    def forward(self, out: Output, batch: DataBatch, step: int) -> Tensor:
        return self.geco(out.kl, constraint_batch(out, batch))


@hookimpl
def geco_register_objectives(register):
    for objective in (ELBO, Beta, AnnealedBeta, GecoObjective):
        register(objective)
