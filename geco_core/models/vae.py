"""The baseline VAEs: a diagonal-Gaussian posterior ``q(z|x)``, a standard-normal prior, analytic KL."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from geco_core.errors import ConfigError
from geco_core.models.base import VAE, DiagonalGaussian, Output

__all__ = ["ConvEncoder", "ConvDecoder", "GaussianVAE", "ConvVAE", "MLPVAE"]


def _check_shape(model: str, image_shape: Sequence[int]) -> None:
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ConfigError(f"model {model!r}: image_shape must be (C, H, W), got {tuple(image_shape)}")


class ConvEncoder(nn.Module):
    """Strided 4x4 convolutions (each halves H and W), then a hidden layer: ``(B, C, H, W) -> (B, hidden)``.
    ``sizes`` records the spatial size before each convolution, for the decoder to mirror."""

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], hidden: int) -> None:
        super().__init__()
        c, h, w = image_shape
        if min(h, w) >> len(channels) < 1:
            raise ConfigError(f"model: {len(channels)} strided layers (channels) are too many for {h}x{w} images")
        self.sizes: list[tuple[int, int]] = []
        layers: list[nn.Module] = []
        for out in channels:
            self.sizes.append((h, w))
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.SiLU()]
            c, h, w = out, h // 2, w // 2
        self.features = (c, h, w)
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.SiLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.convs(x))


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: ``(B, latent) -> logits (B, C, H, W)`` through transposed
    convolutions that restore the encoder's sizes exactly."""

    def __init__(
        self, encoder: ConvEncoder, channels: Sequence[int], latent_dim: int, out_channels: int, hidden: int
    ) -> None:
        super().__init__()
        c, h, w = self.features = encoder.features
        self.sizes = list(reversed(encoder.sizes))
        self.fc = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, c * h * w), nn.SiLU())
        widths = list(reversed(channels))
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
            for cin, cout in zip(widths, [*widths[1:], out_channels])
        )

    def forward(self, z: Tensor) -> Tensor:
        y = self.fc(z).view(-1, *self.features)
        for i, (deconv, size) in enumerate(zip(self.deconvs, self.sizes)):
            y = deconv(y, output_size=size)
            if i < len(self.deconvs) - 1:
                y = nn.functional.silu(y)
        return y


#: where a Gaussian VAE's reconstructions start (``output_start``)
STARTS = ("grey", "mean")


class GaussianVAE(VAE):
    """A VAE whose ``encoder`` maps x to the ``2 * latent_dim`` parameters of a diagonal Gaussian
    q(z|x) and whose ``decoder`` maps z to logits; prior N(0, I), KL analytic (nats).

    ``output_start = "mean"`` adds a learned per-pixel bias to the decoder's logits that starts at
    the log-odds of the mean training image (``data_mean``, clamped to [0.01, 0.99]): the
    reconstructions start from the average image on its background instead of grey (``"grey"``,
    logits near 0, no extra parameter)."""

    latent_dim: int
    encoder: nn.Module
    decoder: nn.Module

    def _start(self, output_start: str, data_mean: Tensor | Callable[[], Tensor] | None) -> None:
        if output_start not in STARTS:
            raise ConfigError(
                f"model {self.name!r}: output_start must be one of {', '.join(STARTS)}, got {output_start!r}"
            )
        if output_start == "grey":
            self.register_parameter("pixel_bias", None)
            return
        if data_mean is None:
            raise ConfigError(f"model {self.name!r}: output_start = 'mean' needs data_mean (the mean training image)")
        mean = torch.as_tensor(data_mean() if callable(data_mean) else data_mean, dtype=torch.float32)
        if tuple(mean.shape) != self.image_shape:
            raise ConfigError(f"model {self.name!r}: data_mean must be {self.image_shape}, got {tuple(mean.shape)}")
        self.pixel_bias = nn.Parameter(torch.logit(mean.clamp(0.01, 0.99)))

    def _with_pixel_bias(self, logits: Tensor) -> Tensor:
        """The decoder's logits ``(B, C, H, W)`` plus the per-pixel bias, if any."""
        bias = getattr(self, "pixel_bias", None)
        return logits if bias is None else logits + bias

    def posterior(self, x: Tensor, context: Tensor | None = None) -> DiagonalGaussian:
        """q(z|x), a diagonal Gaussian over ``latent_dim`` dimensions."""
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        return DiagonalGaussian(mu, log_var)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Output:
        q = self.posterior(x)
        return Output(self._with_pixel_bias(self.decoder(q.rsample())), q.kl_standard_normal())

    def kl(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Analytic, from the encoder alone."""
        return self.posterior(x).kl_standard_normal()

    def sample_logits(self, n: int, context: Tensor | None = None) -> Tensor:
        z = torch.randn(n, self.latent_dim, device=next(self.parameters()).device)
        return self._with_pixel_bias(self.decoder(z))


class ConvVAE(GaussianVAE):
    """Convolutional VAE: strided convs to a diagonal Gaussian q(z|x), N(0, I) prior, transposed convs.

    KL(q(z|x) || N(0, I)) is analytic (nats). Works for any image size the strides fit
    (1x28x28, 3x28x28, 3x32x32, 3x64x64, ...). ``output_start``: :class:`GaussianVAE`.
    """

    name = "conv-vae"

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_dim: int = 16,
        channels: Sequence[int] = (32, 64),
        hidden: int = 256,
        output_start: str = "grey",
        data_mean: Tensor | Callable[[], Tensor] | None = None,
    ) -> None:
        super().__init__(image_shape)
        _check_shape(self.name, image_shape)
        if latent_dim < 1 or hidden < 1 or not channels or min(channels) < 1:
            raise ConfigError(f"model {self.name!r}: latent_dim, hidden and channels must be positive")
        self.latent_dim = latent_dim
        body = ConvEncoder(image_shape, channels, hidden)
        self.encoder = nn.Sequential(body, nn.Linear(hidden, 2 * latent_dim))
        self.decoder = ConvDecoder(body, channels, latent_dim, image_shape[0], hidden)
        self._start(output_start, data_mean)


class MLPVAE(GaussianVAE):
    """Fully connected VAE on flattened pixels: diagonal Gaussian q(z|x), N(0, I) prior, analytic KL.
    ``output_start``: :class:`GaussianVAE`."""

    name = "mlp-vae"

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_dim: int = 16,
        hidden: Sequence[int] = (512, 256),
        output_start: str = "grey",
        data_mean: Tensor | Callable[[], Tensor] | None = None,
    ) -> None:
        super().__init__(image_shape)
        _check_shape(self.name, image_shape)
        if latent_dim < 1 or not hidden or min(hidden) < 1:
            raise ConfigError(f"model {self.name!r}: latent_dim and hidden must be positive")
        self.latent_dim = latent_dim
        d = math.prod(self.image_shape)
        enc: list[nn.Module] = [nn.Flatten()]
        for a, b in zip([d, *hidden[:-1]], hidden):
            enc += [nn.Linear(a, b), nn.SiLU()]
        self.encoder = nn.Sequential(*enc, nn.Linear(hidden[-1], 2 * latent_dim))
        dec: list[nn.Module] = []
        for a, b in zip([latent_dim, *reversed(hidden[1:])], reversed(hidden)):
            dec += [nn.Linear(a, b), nn.SiLU()]
        self.decoder = nn.Sequential(*dec, nn.Linear(hidden[0], d), nn.Unflatten(1, self.image_shape))
        self._start(output_start, data_mean)
