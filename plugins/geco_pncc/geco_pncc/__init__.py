"""pNCC, the patch normalised cross-correlation constraint of GECO (Table 1 of the paper)::

    C(x, x_hat) = kappa - mean over patches i of  psi(x, i) . psi(x_hat, i)          (<= 0 when met)

psi(x, i) is the whitened (zero-mean, unit-norm) k x k patch of x at location i, so each dot product
is the normalised cross-correlation (NCC) of the two patches, in [-1, 1]. The paper sums over
patches; we average, so kappa (a correlation, e.g. 0.8) does not depend on the image size.

Flat patches. A patch with zero variance has no direction to whiten to. We whiten the centred patch
with one extra constant entry sqrt(eps) (``eps`` in squared pixel units, default 1e-4), which gives
in closed form, with ``var`` and ``cov`` the patch's (co)variances::

    ncc = (cov(x, x_hat) + eps) / sqrt((var(x) + eps) * (var(x_hat) + eps))

It is never NaN and stays in [-1, 1]; two flat patches correlate perfectly (1: a black background
reconstructed black is right), a flat patch against a textured one scores near 0, and patches with
variance well above ``eps`` get their plain NCC.

Computation. Means, variances and covariances of every k x k window come from box filters
(``avg_pool2d`` with stride 1), never from materialised patches: O(pixels) memory. Patches are the
"valid" ones (no padding), one at every pixel position.

Scales (for GECO's controllers): ``value_scale = 1 - kappa`` (from the bound to a perfect
correlation) and ``multiplier_scale = D / (2 (1 - kappa))`` for D pixels, by analogy with RE.

Channels. ``channels="separate"`` (default) correlates each channel's k x k patches on their own
and averages over channels too; ``channels="joint"`` whitens k x k x C patches spanning all channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from geco_core import Batch, ConfigError, Constraint, check_kappa, check_same_shape, hookimpl

__all__ = ["PatchNCC", "patch_ncc"]


def patch_ncc(x: Tensor, y: Tensor, k: int, eps: float = 1e-4, joint: bool = False) -> Tensor:
    """NCC of every valid k x k patch of ``x`` and ``y`` (B, C, H, W): ``(B, C, H-k+1, W-k+1)``, or
    ``(B, 1, ...)`` when ``joint`` (patches span all channels). See the module docstring."""

    def box(t: Tensor) -> Tensor:
        m = F.avg_pool2d(t, k, stride=1)
        return m.mean(1, keepdim=True) if joint else m

    mx, my = box(x), box(y)
    var_x = (box(x * x) - mx * mx).clamp_min(0)
    var_y = (box(y * y) - my * my).clamp_min(0)
    cov = box(x * y) - mx * my
    return (cov + eps) / torch.sqrt((var_x + eps) * (var_y + eps))


class PatchNCC(Constraint):
    """Patch normalised cross-correlation: kappa - mean over k x k patches of NCC(x, x_hat).

    Args:
        kappa: the mean patch correlation to reach, in (-1, 1) (e.g. 0.8).
        patch: patch size k (odd or even, >= 2; the image must be at least k x k).
        eps: regulariser of flat patches, squared pixel units (> 0), see the module docstring.
        channels: ``"separate"`` (each channel's patches) or ``"joint"`` (k x k x C patches).
    """

    name = "pncc"
    units = "mean patch correlation in [-1, 1]"
    tighter, perfect = 1, 1.0

    def __init__(
        self,
        kappa: float,
        patch: int = 5,
        eps: float = 1e-4,
        channels: str = "separate",
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        kappa = check_kappa("pncc", kappa, -1.0, 1.0, what="a correlation in (-1, 1)")
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 2:
            raise ConfigError(f"pncc: patch must be an integer >= 2, got {patch!r}")
        if not isinstance(eps, int | float) or not eps > 0 or not math.isfinite(eps):
            raise ConfigError(f"pncc: eps must be > 0, got {eps!r}")
        if channels not in ("separate", "joint"):
            raise ConfigError(f"pncc: channels must be separate or joint, got {channels!r}")
        if image_shape is not None and min(image_shape[1:]) < patch:
            raise ConfigError(f"pncc: patch {patch} is larger than the images {tuple(image_shape)}")
        self.kappa, self.patch, self.eps, self.channels = kappa, patch, float(eps), channels
        self.dim = 1
        pixels = math.prod(image_shape) if image_shape is not None else 1
        self.value_scale = 1 - kappa  # the way from kappa to a perfect correlation
        self.multiplier_scale = pixels / (2 * self.value_scale)

    def forward(self, batch: Batch) -> Tensor:
        check_same_shape(self.name, batch.x, batch.x_hat)
        if min(batch.x.shape[-2:]) < self.patch:
            raise ValueError(f"pncc: patch {self.patch} is larger than the images {tuple(batch.x.shape[1:])}")
        ncc = patch_ncc(batch.x, batch.x_hat, self.patch, self.eps, joint=self.channels == "joint")
        return self.kappa - ncc.flatten(1).mean(1, keepdim=True)

    def reached(self, values: Tensor) -> Tensor:
        """The mean patch correlation that constraint values stand for: ``kappa - value``."""
        return self.kappa - values

    def extra_repr(self) -> str:
        return f"kappa={self.kappa}, patch={self.patch}, eps={self.eps}, channels={self.channels!r}"


@hookimpl
def geco_register_constraints(register):
    register(PatchNCC)
