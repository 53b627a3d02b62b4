"""VAE with a RealNVP posterior (Dinh et al. 2017): the paper's VAE+NVP.

The encoder's features ``h`` (the conv VAE's encoder body) give a diagonal Gaussian ``q0(z0 | x)``;
K affine coupling layers with alternating masks, each conditioned on ``h``, map ``z0`` to ``z``::

    z_(k+1) = m * z_k + (1 - m) * (z_k * exp(s_k) + t_k),    (s_k, t_k) = MLP(m * z_k, h)
    log q(z | x) = log q0(z0 | x) - sum_k sum((1 - m) * s_k)

``s_k`` is bounded by a tanh. The decoder is the conv VAE's. The KL is estimated by Monte Carlo
with the sample the decoder sees: ``log q(z|x) - log N(z; 0, I)`` (nats; one sample, so it can be
negative for an example). The flow inverts exactly, so ``log q(z | x_j)`` is available for any z
(:meth:`FlowPosterior.log_prob`), which the marginal KL needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import Tensor, nn

from geco_core.errors import ConfigError
from geco_core.models.base import VAE, DiagonalGaussian, Output, standard_normal_log_prob
from geco_core.models.vae import ConvDecoder, ConvEncoder

__all__ = ["AffineCoupling", "FlowPosterior", "VAENVP"]


class AffineCoupling(nn.Module):
    """One conditional affine coupling on ``dim`` latents; ``mask`` marks the ones passed through."""

    def __init__(self, dim: int, condition: int, hidden: int, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.net = nn.Sequential(
            nn.Linear(dim + condition, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2 * dim),
        )
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, passed: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(torch.cat([passed, h], dim=-1)).chunk(2, dim=-1)
        free = 1.0 - self.mask
        return torch.tanh(s) * free, t * free

    def forward(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_next, log|det dz_next/dz|)``, the latter ``(B,)``."""
        s, t = self._scale_shift(z * self.mask, h)
        return z * self.mask + (1.0 - self.mask) * (z * s.exp() + t), s.sum(-1)

    def inverse(self, y: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log|det dy/dz|)`` with ``forward(z) == y``: the passed half is unchanged, so the
        same ``s, t`` come out and the free half is solved exactly."""
        s, t = self._scale_shift(y * self.mask, h)
        return y * self.mask + (1.0 - self.mask) * ((y - t) * (-s).exp()), s.sum(-1)


@attrs.define(eq=False)  # not frozen: torch.compile traces plain attribute sets
class FlowPosterior:
    """``q(z | x)``: the base Gaussian ``q0`` pushed through the couplings, all conditioned on ``h``."""

    base: DiagonalGaussian
    layers: Sequence[AffineCoupling]
    h: Tensor

    def rsample(self) -> tuple[Tensor, Tensor]:
        """A reparameterised sample ``z`` and its ``log q(z | x)`` (nats, ``(B,)``)."""
        z = self.base.rsample()
        log_q = self.base.log_prob(z)
        for layer in self.layers:
            z, log_det = layer(z, self.h)
            log_q = log_q - log_det
        return z, log_q

    def sample(self) -> Tensor:
        return self.rsample()[0]

    def take(self, index: Tensor) -> FlowPosterior:
        return FlowPosterior(self.base.take(index), self.layers, self.h[index])

    def log_prob(self, z: Tensor) -> Tensor:
        """``log q(z | x)`` for any ``z`` ``(B, D)``, by inverting the flow (nats, ``(B,)``)."""
        total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for layer in reversed(self.layers):
            z, log_det = layer.inverse(z, self.h)
            total = total + log_det
        return self.base.log_prob(z) - total


class VAENVP(VAE):
    """VAE whose posterior is a diagonal Gaussian followed by a conditional RealNVP flow; conv
    encoder and decoder as in the conv VAE; N(0, I) prior; KL by Monte Carlo (nats)."""

    name = "vae-nvp"

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_dim: int = 32,
        channels: Sequence[int] = (32, 64),
        hidden: int = 256,
        flow_layers: int = 4,
        flow_hidden: int = 256,
    ) -> None:
        super().__init__(image_shape)
        if latent_dim < 2 or flow_layers < 1 or flow_hidden < 1 or hidden < 1:
            raise ConfigError(f"model {self.name!r}: latent_dim >= 2, flow_layers, flow_hidden, hidden >= 1")
        self.latent_dim = latent_dim
        self.body = ConvEncoder(self.image_shape, channels, hidden)
        self.base_head = nn.Linear(hidden, 2 * latent_dim)
        even = torch.arange(latent_dim) % 2 == 0
        self.flow = nn.ModuleList(
            AffineCoupling(latent_dim, hidden, flow_hidden, even if k % 2 == 0 else ~even) for k in range(flow_layers)
        )
        self.decoder = ConvDecoder(self.body, channels, latent_dim, self.image_shape[0], hidden)

    def posterior(self, x: Tensor, context: Tensor | None = None) -> FlowPosterior:
        h = self.body(x)
        mu, log_var = self.base_head(h).chunk(2, dim=-1)
        return FlowPosterior(DiagonalGaussian(mu, log_var), list(self.flow), h)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Output:
        z, log_q = self.posterior(x).rsample()
        return Output(self.decoder(z), log_q - standard_normal_log_prob(z))

    def kl(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """One-sample Monte Carlo, from the encoder and the flow alone (the same draw as ``forward``)."""
        z, log_q = self.posterior(x).rsample()
        return log_q - standard_normal_log_prob(z)

    def sample_logits(self, n: int, context: Tensor | None = None) -> Tensor:
        return self.decoder(torch.randn(n, self.latent_dim, device=self.base_head.weight.device))
