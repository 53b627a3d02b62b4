"""The training objectives, one interface for all: ``objective(out, batch, step) -> (loss, metrics)``.

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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geco_core.constraint import Batch
from geco_core.data.base import DataBatch
from geco_core.errors import ConfigError
from geco_core.geco import GECO
from geco_core.models.base import Output

__all__ = ["Objective", "Likelihood", "ELBO", "Beta", "AnnealedBeta", "GecoObjective", "OBJECTIVES"]

Metrics = dict[str, Tensor]


class Likelihood(nn.Module):
    """p(x|z): ``gaussian`` with a global sigma (learned unless ``learn_sigma=False``) or ``bernoulli``."""

    def __init__(self, kind: str = "gaussian", sigma: float = 0.1, learn_sigma: bool = True) -> None:
        super().__init__()
        if kind not in ("gaussian", "bernoulli"):
            raise ConfigError(f"objective.likelihood must be gaussian or bernoulli, got {kind!r}")
        if not sigma > 0:
            raise ConfigError(f"objective.sigma must be > 0, got {sigma!r}")
        self.kind = kind
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)), requires_grad=learn_sigma)

    def nll(self, out: Output, x: Tensor) -> Tensor:
        """Per-example negative log-likelihood in nats, summed over pixels: ``(B,)``."""
        if self.kind == "bernoulli":
            return F.binary_cross_entropy_with_logits(out.logits, x, reduction="none").flatten(1).sum(1)
        log_sigma = self.log_sigma.to(x.dtype)
        sq = (x - out.x_hat).square().flatten(1)
        return 0.5 * (sq * torch.exp(-2 * log_sigma) + 2 * log_sigma + math.log(2 * math.pi)).sum(1)


class Objective(nn.Module):
    """``forward(out, batch, step) -> (loss, metrics)``; metrics are detached scalar tensors.
    Objectives that enforce constraints hold their :class:`GECO` as ``geco``."""

    def metrics(self, out: Output, batch: DataBatch) -> Metrics:
        """What every objective reports: KL (nats/example) and the pixel RMSE of the batch."""
        return {
            "kl": out.kl.detach().mean(),
            "rmse": (batch.x - out.x_hat.detach()).square().mean().sqrt(),
        }


class ELBO(Objective):
    """Maximise the ELBO: minimise NLL + KL (nats per example)."""

    def __init__(self, likelihood: Likelihood) -> None:
        super().__init__()
        self.likelihood = likelihood

    def beta(self, step: int) -> float:
        return 1.0

    def forward(self, out: Output, batch: DataBatch, step: int) -> tuple[Tensor, Metrics]:
        nll = self.likelihood.nll(out, batch.x)
        beta = self.beta(step)
        loss = (nll + beta * out.kl).mean()
        m = self.metrics(out, batch)
        m["nll"] = nll.detach().mean()
        m["beta"] = torch.tensor(beta)
        if self.likelihood.kind == "gaussian":
            m["sigma"] = self.likelihood.log_sigma.detach().exp()
        return loss, m


class Beta(ELBO):
    """beta-VAE: minimise NLL + beta * KL with a fixed beta > 0."""

    def __init__(self, likelihood: Likelihood, beta: float) -> None:
        super().__init__(likelihood)
        if not beta > 0:
            raise ConfigError(f"objective.beta must be > 0, got {beta!r}")
        self._beta = float(beta)

    def beta(self, step: int) -> float:
        return self._beta


class AnnealedBeta(ELBO):
    """The paper's hand-annealed baseline: NLL + beta(step) * KL, beta moving linearly from
    ``beta_start`` to ``beta_end`` over ``anneal_steps`` steps, then constant (paper: 2.0 -> 0.7)."""

    def __init__(self, likelihood: Likelihood, beta_start: float, beta_end: float, anneal_steps: int) -> None:
        super().__init__(likelihood)
        if not (beta_start > 0 and beta_end > 0):
            raise ConfigError(f"objective.beta_start and beta_end must be > 0, got {beta_start}, {beta_end}")
        if anneal_steps < 1:
            raise ConfigError(f"objective.anneal_steps must be >= 1, got {anneal_steps}")
        self.beta_start, self.beta_end, self.anneal_steps = (
            float(beta_start),
            float(beta_end),
            int(anneal_steps),
        )

    def beta(self, step: int) -> float:
        f = min(step / self.anneal_steps, 1.0)
        return self.beta_start + f * (self.beta_end - self.beta_start)


class GecoObjective(Objective):
    """GECO: minimise KL + lambda . C over the stacked constraints (see :class:`GECO`)."""

    def __init__(self, geco: GECO) -> None:
        super().__init__()
        self.geco = geco

    def forward(self, out: Output, batch: DataBatch, step: int) -> tuple[Tensor, Metrics]:
        constraint_batch = Batch(
            x=batch.x, x_hat=out.x_hat, labels=batch.labels, context=batch.context, index=batch.index
        )
        loss = self.geco(out.kl, constraint_batch)
        return loss, self.metrics(out, batch)


OBJECTIVES = ("elbo", "beta", "annealed-beta", "geco")
