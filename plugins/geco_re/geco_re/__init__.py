"""RE, the pixel reconstruction error constraint of GECO (Table 1 of the paper)::

    C(x, x_hat) = mean over pixels of (x - x_hat)^2  -  kappa^2          (<= 0 when met)

kappa is a root-mean-square error per pixel, for pixels in [0, 1] (the paper uses 0.06 to 0.175);
``kappa_psnr`` gives it as a peak signal-to-noise ratio in dB instead, ``PSNR = -20 log10(RMSE)``
(20 dB is an RMSE of 0.1, 30 dB of 0.032). Summaries, ``geco eval`` and plots show both. The
paper's table writes a sum over pixels; the mean makes kappa independent of the image size.

Scales (for GECO's controllers): a change of kappa^2 in the mean squared error is a meaningful one
(``value_scale``); the natural multiplier is ``D / (2 kappa^2)`` for D pixels per component
(``multiplier_scale``): the weight of the squared error in a Gaussian ELBO with sigma = kappa.
"""

from __future__ import annotations

import math

from torch import Tensor

from geco_core import Batch, ConfigError, Constraint, Units, check_kappa, check_same_shape, hookimpl

__all__ = ["ReconstructionError", "psnr", "rmse"]

PER = ("image", "channel", "pixel")


def psnr(rmse: float) -> float:
    """The peak signal-to-noise ratio in dB of a pixel RMSE (pixels in [0, 1]): ``-20 log10(rmse)``."""
    return -20 * math.log10(rmse) if rmse > 0 else math.inf


def rmse(psnr_db: float) -> float:
    """The pixel RMSE of a PSNR in dB: ``10 ** (-psnr / 20)``."""
    return 10 ** (-psnr_db / 20)


class ReconstructionError(Constraint):
    """Pixel reconstruction error mean((x - x_hat)^2) - kappa^2, kappa a pixel RMSE.

    Args:
        kappa: the tolerated root-mean-square pixel error, > 0 (pixels in [0, 1]).
        kappa_psnr: the same as a peak signal-to-noise ratio in dB (pixels in [0, 1]), instead of
            ``kappa``: ``kappa = 10 ** (-kappa_psnr / 20)``.
        per: ``"image"`` bounds the error over the whole image (one component); ``"channel"``
            bounds each channel's error (C components); ``"pixel"`` bounds every dimension
            independently (C*H*W components), the paper's "bound the reconstruction error
            independently for each dimension".
        image_shape: ``(C, H, W)``, needed for ``per="channel"`` or ``"pixel"`` (the trainer passes
            it); without it (``per="image"``) the natural multiplier assumes one pixel.
    """

    name = "re"
    units = "pixel RMSE (pixels in [0, 1])"
    also = Units("psnr", "dB", psnr, rmse)
    tighter, perfect = -1, 0.0  # a smaller RMSE is tighter; 0 is a perfect reconstruction

    def __init__(
        self,
        kappa: float | None = None,
        per: str = "image",
        image_shape: tuple[int, int, int] | None = None,
        kappa_psnr: float | None = None,
    ) -> None:
        super().__init__()
        if (kappa is None) == (kappa_psnr is None):
            raise ConfigError("re: give kappa (a pixel RMSE, e.g. 0.1) or kappa_psnr (in dB, e.g. 20), one of them")
        if kappa_psnr is not None:
            if not isinstance(kappa_psnr, int | float) or isinstance(kappa_psnr, bool) or not 0 < kappa_psnr < math.inf:
                raise ConfigError(f"re: kappa_psnr must be a PSNR in dB > 0 (e.g. 20), got {kappa_psnr!r}")
            kappa = rmse(kappa_psnr)
        kappa = check_kappa("re", kappa, 0.0, 1.0, what="a pixel RMSE in (0, 1) (e.g. 0.1; pixels lie in [0, 1])")
        if per not in PER:
            raise ConfigError(f"re: per must be one of {', '.join(PER)}; got {per!r}")
        if per != "image" and (image_shape is None or len(image_shape) != 3 or min(image_shape) < 1):
            raise ConfigError(f"re: per={per!r} needs image_shape=(C, H, W), got {image_shape!r}")
        self.kappa = float(kappa)
        self.per = per
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)
        if per == "image":
            self.dim, pixels = 1, math.prod(self.image_shape) if self.image_shape else 1
        elif per == "channel":
            self.dim, pixels = self.image_shape[0], math.prod(self.image_shape[1:])
        else:
            self.dim, pixels = math.prod(self.image_shape), 1
        self.value_scale = self.kappa**2
        self.multiplier_scale = pixels / (2 * self.kappa**2)

    def forward(self, batch: Batch) -> Tensor:
        x, x_hat = batch.x, batch.x_hat
        check_same_shape(self.name, x, x_hat)
        if self.per != "image" and tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"re: per={self.per!r} was set up for images {self.image_shape}, got {tuple(x.shape[1:])}")
        sq = (x - x_hat).square()
        if self.per == "image":
            mse = sq.flatten(1).mean(dim=1, keepdim=True)
        elif self.per == "channel":
            mse = sq.flatten(2).mean(dim=2)
        else:
            mse = sq.flatten(1)
        return mse - self.kappa**2

    def reached(self, values: Tensor) -> Tensor:
        """The pixel RMSE that constraint values stand for: ``sqrt(value + kappa^2)``."""
        return (values + self.kappa**2).clamp_min(0).sqrt()

    def extra_repr(self) -> str:
        return f"kappa={self.kappa}, per={self.per!r}"


@hookimpl
def geco_register_constraints(register):
    register(ReconstructionError)
