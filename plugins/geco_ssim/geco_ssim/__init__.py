"""SSIM, the structural similarity constraint for GECO::

    C(x, x_hat) = kappa - SSIM(x, x_hat)          (<= 0 when met)

SSIM (Wang, Bovik, Sheikh & Simoncelli 2004) compares the local means, variances and covariance of
the two images in a Gaussian window (11 x 11, sigma 1.5), with ``c1 = (0.01 L)^2`` and
``c2 = (0.03 L)^2`` for pixels in [0, L] = [0, 1], over the "valid" windows (no padding), and
averages the map over positions (and over channels unless ``per = "channel"``). kappa is an SSIM:
1 is a perfect reconstruction, 0 no structure in common; 0.8 to 0.95 are the usual targets. MS-SSIM
(``multiscale = true``) combines five scales; it needs images of more than 160 pixels a side.

Computed by pytorch-msssim (``pytorch_msssim.ssim``), which agrees with a float64 implementation of
the definition to float32 round-off and runs forward and backward about ten times faster than
torchmetrics' (``docs/BENCHMARKS.md``, "SSIM").

Scales (for GECO's controllers): ``value_scale = 1 - kappa`` (from the bound to a perfect
similarity) and ``multiplier_scale = D / (2 (1 - kappa))`` for D pixels per component, as pNCC's.
"""

from __future__ import annotations

import math

from torch import Tensor

from geco_core import Batch, ConfigError, Constraint, check_kappa, check_same_shape, hookimpl

__all__ = ["StructuralSimilarity"]

PER = ("image", "channel")
#: MS-SSIM's five scales halve the image four times; each scale needs a whole window
MULTISCALE_MIN = (11 - 1) * 2**4 + 1


class StructuralSimilarity(Constraint):
    """Structural similarity: kappa - SSIM(x, x_hat), kappa an SSIM in (-1, 1), e.g. 0.9.

    Args:
        kappa: the SSIM the reconstructions must reach.
        per: ``"image"`` (one component, the SSIM averaged over channels) or ``"channel"`` (one
            component per channel).
        multiscale: MS-SSIM instead of SSIM (images larger than 160 px a side).
        image_shape: ``(C, H, W)`` (the trainer passes it): checked against the window.
    """

    name = "ssim"
    units = "SSIM (1: identical)"
    tighter, perfect = 1, 1.0

    def __init__(
        self,
        kappa: float,
        per: str = "image",
        multiscale: bool = False,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.kappa = check_kappa("ssim", kappa, -1.0, 1.0, what="an SSIM in (-1, 1), e.g. 0.9")
        if per not in PER:
            raise ConfigError(f"ssim: per must be image or channel, got {per!r}")
        smallest = min(image_shape[1:]) if image_shape is not None else None
        if smallest is not None and smallest < (MULTISCALE_MIN if multiscale else 11):
            what = f"MS-SSIM needs images of at least {MULTISCALE_MIN} px a side" if multiscale else "an 11 x 11 window"
            raise ConfigError(f"ssim: {what}; these are {image_shape[1]} x {image_shape[2]} (use per-scale SSIM)")
        self.per, self.multiscale = per, bool(multiscale)
        channels = image_shape[0] if image_shape is not None else 1
        self.dim = channels if per == "channel" else 1
        pixels = math.prod(image_shape) // self.dim if image_shape is not None else 1
        self.value_scale = 1.0 - self.kappa
        self.multiplier_scale = pixels / (2 * (1.0 - self.kappa))

    def forward(self, batch: Batch) -> Tensor:
        from pytorch_msssim import ms_ssim, ssim

        x, x_hat = batch.x, batch.x_hat
        check_same_shape(self.name, x, x_hat)
        b, c, h, w = x.shape
        if self.per == "channel":
            x, x_hat = x.reshape(b * c, 1, h, w), x_hat.reshape(b * c, 1, h, w)
        measure = ms_ssim if self.multiscale else ssim
        similarity = measure(x_hat, x, data_range=1.0, size_average=False)
        return self.kappa - similarity.reshape(b, self.dim)

    def reached(self, values: Tensor) -> Tensor:
        """The SSIM that constraint values stand for: ``kappa - value``."""
        return self.kappa - values

    def extra_repr(self) -> str:
        return f"kappa={self.kappa}, per={self.per!r}, multiscale={self.multiscale}"


@hookimpl
def geco_register_constraints(register):
    register(StructuralSimilarity)
