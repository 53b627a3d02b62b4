"""What every model returns and the posterior it is built on.

A model maps targets ``x`` (and a context, if conditional) to decoder logits and a per-example KL in
nats; ``x_hat = sigmoid(logits)`` is the reconstruction mean, pixels in [0, 1]. Models sample from
their prior with :meth:`VAE.sample`.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar, Protocol

import attrs
import torch
from torch import Tensor, nn

__all__ = ["Output", "Posterior", "DiagonalGaussian", "VAE", "standard_normal_log_prob"]

LOG_2PI = math.log(2 * math.pi)


@attrs.define(eq=False, slots=False)  # not frozen: torch.compile traces plain attribute sets
class Output:
    """One forward pass: ``logits`` (B, C, H, W) and ``kl`` (B,) in nats, summed over latents;
    ``x_hat = sigmoid(logits)``, the reconstruction mean, pixels in [0, 1]."""

    logits: Tensor
    kl: Tensor
    x_hat: Tensor = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.x_hat = torch.sigmoid(self.logits)


class Posterior(Protocol):
    """``q(z | x)`` for a batch of examples, over flattened latents ``(B, D)``.

    ``log_prob`` scores any ``z``, not only the posterior's own samples: the marginal KL of
    :mod:`geco_core.evaluation` evaluates ``log q(z_j | x_i)`` for every pair of examples.
    """

    def sample(self) -> Tensor:
        """One draw ``z ~ q(z | x)`` per example, ``(B, D)``."""
        ...

    def log_prob(self, z: Tensor) -> Tensor:
        """``log q(z_b | x_b)`` in nats for each row b, ``(B,)``."""
        ...

    def take(self, index: Tensor) -> Posterior:
        """The posteriors of the examples at ``index`` (repeats allowed)."""
        ...


@attrs.define(eq=False)  # not frozen: torch.compile traces plain attribute sets
class DiagonalGaussian:
    """``N(mu, diag(exp(log_var)))`` over the last dimension; batch in the first."""

    mu: Tensor
    log_var: Tensor

    def rsample(self) -> Tensor:
        """Reparameterised sample ``mu + sigma * eps``, eps ~ N(0, I)."""
        return self.mu + (0.5 * self.log_var).exp() * torch.randn_like(self.mu)

    sample = rsample  # the Posterior protocol's name

    def take(self, index: Tensor) -> DiagonalGaussian:
        """The posteriors of the examples at ``index``."""
        return DiagonalGaussian(self.mu[index], self.log_var[index])

    def log_prob(self, z: Tensor) -> Tensor:
        """``log q(z)`` in nats, summed over the latent dimension: ``(B,)``."""
        return -0.5 * ((z - self.mu).square() / self.log_var.exp() + self.log_var + LOG_2PI).sum(-1)

    def kl(self, other: DiagonalGaussian) -> Tensor:
        """Analytic ``KL(self || other)``, nats, summed over the last dimension: ``(B,)``.

        ``0.5 * sum(log s_o^2 - log s^2 + (s^2 + (mu - mu_o)^2) / s_o^2 - 1)``."""
        return 0.5 * (
            other.log_var
            - self.log_var
            + (self.log_var.exp() + (self.mu - other.mu).square()) / other.log_var.exp()
            - 1.0
        ).sum(-1)

    def kl_standard_normal(self) -> Tensor:
        """Analytic ``KL(q || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)``, nats: ``(B,)``."""
        return 0.5 * (self.mu.square() + self.log_var.exp() - 1.0 - self.log_var).sum(-1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over the last dimension, nats."""
    return -0.5 * (z.square() + LOG_2PI).sum(-1)


class VAE(nn.Module, abc.ABC):
    """Base of the models: ``forward(x, context=None) -> Output`` and ``sample(n, context=None)``.

    Subclasses set ``name`` (registry name) and take ``image_shape=(C, H, W)`` (and ``context_shape``
    if ``conditional``) from the dataset.
    """

    name: ClassVar[str] = ""
    conditional: ClassVar[bool] = False

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)

    @abc.abstractmethod
    def forward(self, x: Tensor, context: Tensor | None = None) -> Output:
        """Encode, sample ``z ~ q(z|x)``, decode: logits and per-example KL."""

    def posterior(self, x: Tensor, context: Tensor | None = None) -> Posterior | None:
        """``q(z | x)`` (see :class:`Posterior`); None where a model does not expose it, which leaves
        its marginal KL undefined in ``geco eval``."""
        return None

    def kl(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Per-example ``KL[q(z|x) || p(z)]`` in nats, ``(B,)``: by default from a whole forward pass;
        models whose KL needs only the encoder override this to skip the decoder."""
        return self(x, context).kl

    def prior_log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(z)`` in nats, ``(B,)``; the standard normal unless the model learns its prior."""
        return standard_normal_log_prob(z)

    @abc.abstractmethod
    def sample_logits(self, n: int, context: Tensor | None = None) -> Tensor:
        """Decoder logits for ``n`` draws from the prior, ``(n, C, H, W)``."""

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        """``n`` samples from the prior, as decoder means in [0, 1]."""
        return torch.sigmoid(self.sample_logits(n, context))
