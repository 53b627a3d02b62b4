"""ConvDraw (Gregor et al. 2016, "Towards conceptual compression"; the generator of GQN, Eslami et al.
2018), unconditional and conditional.

Everything recurrent runs on feature maps at 1/4 of the image resolution (28x28 -> 7x7). At each of
T steps, with ``h_dec`` the decoder state and ``canvas`` the running logits::

    prior      p(z_t | z_<t)    = N(mu, sigma) from conv(h_dec_(t-1) [, r])            (conv: kernel x kernel)
    encoder    h_enc_t          = ConvLSTM(read(x, x - sigmoid(canvas)), h_dec_(t-1) [, r]; h_enc_(t-1))
    posterior  q(z_t | x, z_<t) = N(mu, sigma) from conv(h_enc_t)
    decoder    h_dec_t          = ConvLSTM(z_t [, r]; h_dec_(t-1))
    canvas    += write(h_dec_t)                       (a 4x4 transposed convolution, stride 4)

The logits are the final canvas; the KL is the sum over steps of ``KL(q_t || p_t)``, analytic per
step, summed over the latent map (nats). ``r`` is the conditional model's encoding of its context
images, fed to the prior, the encoder and the decoder. Sampling runs the decoder with ``z_t ~ p_t``.

Defaults are sized for a CPU (hidden 32, 3x3 kernels: about 650 images/s per training step on 2
cores); GQN's own sizes (hidden 256, 5x5 kernels) are options.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

from geco_core.errors import ConfigError
from geco_core.models.base import VAE, DiagonalGaussian, Output

__all__ = ["ConvLSTMCell", "ConvDraw", "ConditionalConvDraw", "DrawPosterior", "map_gaussian"]


class ConvLSTMCell(nn.Module):
    """An LSTM whose gates are ``kernel x kernel`` convolutions of ``[input, h]``; state ``(h, c)``."""

    def __init__(self, in_channels: int, hidden: int, kernel: int = 3) -> None:
        super().__init__()
        self.gates = nn.Conv2d(in_channels + hidden, 4 * hidden, kernel, padding=kernel // 2)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        i, f, o, g = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def map_gaussian(params: Tensor) -> DiagonalGaussian:
    """``(B, 2z, h, w)`` conv output -> a diagonal Gaussian over the flattened ``z x h x w`` map."""
    mu, log_var = params.chunk(2, dim=1)
    return DiagonalGaussian(mu.flatten(1), log_var.flatten(1))


class _Draw(VAE):
    def __init__(
        self,
        image_shape: tuple[int, int, int],
        steps: int,
        z_channels: int,
        hidden: int,
        kernel: int,
        context_shape: tuple[int, int, int] | None,
    ) -> None:
        super().__init__(image_shape)
        c, h, w = self.image_shape
        if h % 4 or w % 4:
            raise ConfigError(f"model {self.name!r}: image height and width must be multiples of 4, got {h}x{w}")
        if steps < 1 or z_channels < 1 or hidden < 1 or kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"model {self.name!r}: steps, z_channels, hidden >= 1 and an odd kernel, please")
        self.steps, self.z_channels, self.hidden = steps, z_channels, hidden
        self.map_size = (h // 4, w // 4)
        r = 0
        if context_shape is not None:
            if tuple(context_shape[1:]) != (h, w):
                raise ConfigError(
                    f"model {self.name!r}: context {tuple(context_shape)} and images {self.image_shape} differ in size"
                )
            r = hidden
            self.context_net = nn.Sequential(
                nn.Conv2d(context_shape[0], hidden, 4, stride=4), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1)
            )
        self.read = nn.Conv2d(2 * c, hidden, 4, stride=4)
        pad = kernel // 2
        self.encoder = ConvLSTMCell(hidden + hidden + r, hidden, kernel)
        self.posterior_net = nn.Conv2d(hidden, 2 * z_channels, kernel, padding=pad)
        self.prior_net = nn.Conv2d(hidden + r, 2 * z_channels, kernel, padding=pad)
        self.decoder = ConvLSTMCell(z_channels + r, hidden, kernel)
        self.write = nn.ConvTranspose2d(hidden, c, 4, stride=4)
        self.canvas0 = nn.Parameter(torch.zeros(1, *self.image_shape))

    def _state(self, n: int, ref: Tensor) -> tuple[Tensor, Tensor]:
        zeros = ref.new_zeros(n, self.hidden, *self.map_size)
        return zeros, zeros

    def _with(self, t: Tensor, r: Tensor | None) -> Tensor:
        return t if r is None else torch.cat([t, r], dim=1)

    def _context(self, context: Tensor | None) -> Tensor | None:
        if not self.conditional:
            return None
        if context is None:
            raise ValueError(f"model {self.name!r} needs the context images")
        return self.context_net(context)

    def _unroll(
        self, x: Tensor, r: Tensor | None, z: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]:
        """Run the T steps on targets ``x``, latents drawn from q or, if given, taken from ``z``
        ``(B, T * Z)``. Returns the logits, the per-step KLs, the latents ``(B, T * Z)``,
        ``log q(z | x)`` and ``log p(z)`` (nats, ``(B,)``)."""
        n = x.shape[0]
        enc, dec = self._state(n, x), self._state(n, x)
        canvas = self.canvas0.expand(n, -1, -1, -1)
        given = None if z is None else z.view(n, self.steps, -1).unbind(1)
        kls, zs, log_q, log_p = [], [], x.new_zeros(n), x.new_zeros(n)
        for t in range(self.steps):
            p = map_gaussian(self.prior_net(self._with(dec[0], r)))
            features = self.read(torch.cat([x, x - torch.sigmoid(canvas)], dim=1))
            enc = self.encoder(self._with(torch.cat([features, dec[0]], dim=1), r), enc)
            q = map_gaussian(self.posterior_net(enc[0]))
            kls.append(q.kl(p))
            z_t = q.rsample() if given is None else given[t]
            zs.append(z_t)
            if z is not None:
                log_q, log_p = log_q + q.log_prob(z_t), log_p + p.log_prob(z_t)
            dec = self.decoder(self._with(z_t.view(n, self.z_channels, *self.map_size), r), dec)
            canvas = canvas + self.write(dec[0])
        return canvas, kls, torch.cat(zs, 1), log_q, log_p

    def _decode(self, n: int, r: Tensor | None, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The decoder alone, latents drawn from the prior or taken from ``z``: logits and ``log p(z)``."""
        dec = self._state(n, self.canvas0)
        canvas = self.canvas0.expand(n, -1, -1, -1)
        given = None if z is None else z.view(n, self.steps, -1).unbind(1)
        log_p = self.canvas0.new_zeros(n)
        for t in range(self.steps):
            p = map_gaussian(self.prior_net(self._with(dec[0], r)))
            z_t = p.rsample() if given is None else given[t]
            if z is not None:
                log_p = log_p + p.log_prob(z_t)
            dec = self.decoder(self._with(z_t.view(n, self.z_channels, *self.map_size), r), dec)
            canvas = canvas + self.write(dec[0])
        return canvas, log_p

    def forward_steps(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Logits and the per-step KLs ``KL(q_t || p_t)`` (each ``(B,)``, nats)."""
        logits, kls, *_ = self._unroll(x, self._context(context))
        return logits, kls

    def forward(self, x: Tensor, context: Tensor | None = None) -> Output:
        logits, kls = self.forward_steps(x, context)
        return Output(logits, torch.stack(kls).sum(0))

    def posterior(self, x: Tensor, context: Tensor | None = None) -> DrawPosterior:
        return DrawPosterior(self, x, self._context(context))

    def prior_log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(z) = sum_t log p(z_t | z_<t)`` under the learned autoregressive prior, nats."""
        return self._decode(len(z), self._context(context), z)[1]

    def sample_logits(self, n: int, context: Tensor | None = None) -> Tensor:
        r = self._context(context)
        return self._decode(n if r is None else len(r), r)[0]


@attrs.define(eq=False)  # not frozen: torch.compile traces plain attribute sets
class DrawPosterior:
    """``q(z | x) = prod_t q(z_t | x, z_<t)`` over the T latent maps, flattened to ``(B, T * Z)``.
    ``log_prob`` runs the encoder on ``x`` with the decoder fed the given latents (teacher forcing)."""

    model: _Draw
    x: Tensor
    r: Tensor | None

    def sample(self) -> Tensor:
        return self.model._unroll(self.x, self.r)[2]

    def log_prob(self, z: Tensor) -> Tensor:
        return self.model._unroll(self.x, self.r, z)[3]

    def take(self, index: Tensor) -> DrawPosterior:
        return DrawPosterior(self.model, self.x[index], None if self.r is None else self.r[index])


class ConvDraw(_Draw):
    """ConvDraw: T steps of convolutional LSTM encoder and decoder, a latent map per step with a
    learned autoregressive prior, an accumulating canvas; KL summed over steps (nats)."""

    name = "convdraw"

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        steps: int = 4,
        z_channels: int = 8,
        hidden: int = 32,
        kernel: int = 3,
    ) -> None:
        super().__init__(image_shape, steps, z_channels, hidden, kernel, context_shape=None)


class ConditionalConvDraw(_Draw):
    """Conditional ConvDraw: models p(target | context); an encoding of the context images is fed to
    the prior, the posterior's encoder and the decoder at every step."""

    name = "conditional-convdraw"
    conditional = True

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        context_shape: tuple[int, int, int],
        steps: int = 4,
        z_channels: int = 8,
        hidden: int = 32,
        kernel: int = 3,
    ) -> None:
        super().__init__(image_shape, steps, z_channels, hidden, kernel, context_shape=tuple(context_shape))
