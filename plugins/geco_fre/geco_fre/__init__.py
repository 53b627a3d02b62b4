"""FRE, the feature reconstruction error constraint of GECO (Table 1 of the paper)::

    C(x, x_hat) = mean over stages s of  mean((f_s(x) - f_s(x_hat))^2)  -  kappa^2     (<= 0 when met)

f_s are the feature maps of the early stages of a frozen ResNet (``network.py``; the paper uses "the
first 8 layers of a resnet classifier"). Each stage's squared error is averaged over its channels and
positions, then the stages are averaged, so kappa is a root-mean-square feature error in the units of
the network's activations (post batch-norm and ReLU), whatever the image size.

Channels. A network with one input channel (the shipped one) sees each channel of a colour image on
its own, as a grey image, and the errors of all channels are averaged; a network with three input
channels (timm's ImageNet weights) sees a grey image repeated three times.

Scales (for GECO's controllers): ``value_scale = kappa^2`` and ``multiplier_scale = F / (2 kappa^2)``
with F the feature values per image and stage, by analogy with RE's pixels.

Target features need no gradient: they are computed without autograd, and with ``cache=True`` kept
per dataset index (``batch.index``), in float16, on the device of the first batch, in training mode
only (held-out data has other indices). Memory: for 28x28 images and stages (0, 1) of ``resnet18``,
15,680 values, 31 kB per image and channel (1.9 GB for the MNIST training set).
"""

from __future__ import annotations

import torch
from torch import Tensor

from geco_core import Batch, ConfigError, Constraint, check_kappa, check_same_shape, freeze, hookimpl
from geco_fre.network import FeatureNetwork, build_feature_network

__all__ = ["FeatureReconstructionError", "FeatureNetwork", "build_feature_network"]


class FeatureReconstructionError(Constraint):
    """Feature reconstruction error mean((f(x) - f(x_hat))^2) - kappa^2 in early ResNet stages.

    Args:
        kappa: the tolerated root-mean-square feature error, > 0 (activation units; see the README
            for the values typical reconstructions reach).
        weights: ``"shipped"`` (a Fashion-MNIST resnet18's stem and layer1), ``"timm"`` (timm's
            pretrained ImageNet weights, needs the network) or a safetensors file.
        arch: the timm architecture (``resnet18``).
        stages: the feature stages compared (timm ``out_indices``), default (0, 1).
        cache: keep the target features per dataset index (training mode only).
    """

    name = "fre"
    units = "root-mean-square feature error"
    tighter, perfect = -1, 0.0

    def __init__(
        self,
        kappa: float,
        weights: str = "shipped",
        arch: str = "resnet18",
        stages: tuple[int, ...] = (0, 1),
        cache: bool = False,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        kappa = check_kappa("fre", kappa, 0.0, what="a feature RMSE > 0")
        if not stages or any(not isinstance(s, int) or not 0 <= s <= 4 for s in stages):
            raise ConfigError(f"fre: stages must be ResNet stage indices in 0..4, got {stages!r}")
        self.kappa, self.cache, self.stages = kappa, bool(cache), tuple(stages)
        self.compilable = not self.cache  # the cache's bookkeeping depends on the data: no whole graph
        self.weights, self.arch, self.image_shape = weights, arch, image_shape
        self.features = freeze(build_feature_network(weights, arch, self.stages))
        self.dim = 1
        self.value_scale = kappa**2
        self.multiplier_scale = self._feature_values(image_shape) / (2 * kappa**2)
        self._cached: list[Tensor] | None = None
        self._filled: Tensor | None = None

    @torch.no_grad()
    def _feature_values(self, image_shape: tuple[int, int, int] | None) -> int:
        """Feature values per image, per stage on average (the error is a mean of stage means)."""
        if image_shape is None:
            return 1
        maps = self._features(torch.zeros(1, *image_shape))
        return round(sum(f.numel() for f in maps) / len(maps))

    def _grey_batches(self, x: Tensor) -> Tensor:
        """Fit the channels to the network: (B, C, H, W) -> (B*C, 1, H, W) or (B, 3, H, W)."""
        b, c, h, w = x.shape
        if self.features.in_chans == c:
            return x
        if self.features.in_chans == 1:
            return x.reshape(b * c, 1, h, w)
        if c == 1:
            return x.expand(b, self.features.in_chans, h, w)
        raise ValueError(f"fre: a network with {self.features.in_chans} input channels cannot read {c}-channel images")

    def _features(self, x: Tensor) -> list[Tensor]:
        return self.features(self._grey_batches(x))

    @torch.no_grad()
    def _target_features(self, batch: Batch) -> list[Tensor]:
        if not (self.cache and self.training and batch.index is not None):
            return self._features(batch.x)
        index = batch.index.to(batch.x.device)
        per = len(self._grey_batches(batch.x[:1]))  # network inputs per example
        rows = (index[:, None] * per + torch.arange(per, device=index.device)).flatten()
        self._reserve(int(rows.max()) + 1, batch.x)
        missing = ~self._filled[rows]
        if missing.any():
            fresh = self._features(batch.x)
            for store, f in zip(self._cached, fresh):
                store[rows[missing]] = f[missing].to(store.dtype)
            self._filled[rows[missing]] = True
        return [store[rows].to(batch.x.dtype) for store in self._cached]

    def _reserve(self, size: int, x: Tensor) -> None:
        """Grow the cache (doubling) to hold ``size`` rows."""
        have = 0 if self._filled is None else len(self._filled)
        if size <= have:
            return
        capacity = max(size, 2 * have)
        shapes = [f.shape[1:] for f in self._features(x[:1])]
        new = [torch.zeros(capacity, *s, dtype=torch.float16, device=x.device) for s in shapes]
        filled = torch.zeros(capacity, dtype=torch.bool, device=x.device)
        if self._cached is not None:
            for n, old in zip(new, self._cached):
                n[:have] = old
            filled[:have] = self._filled
        self._cached, self._filled = new, filled

    def forward(self, batch: Batch) -> Tensor:
        x, x_hat = batch.x, batch.x_hat
        check_same_shape(self.name, x, x_hat)
        target = self._target_features(batch)
        b = x.shape[0]
        errors = [(f - t).square().reshape(b, -1).mean(1) for f, t in zip(self._features(x_hat), target)]
        return (torch.stack(errors, 1).mean(1, keepdim=True)) - self.kappa**2

    def twin(self) -> FeatureReconstructionError | None:
        """The same constraint under the shipped stages' twin (the same recipe, seed 1); None for
        other weights."""
        if self.weights != "shipped":
            return None
        return FeatureReconstructionError(self.kappa, "twin", self.arch, self.stages, False, self.image_shape)

    def reached(self, values: Tensor) -> Tensor:
        """The feature RMSE that constraint values stand for: ``sqrt(value + kappa^2)``."""
        return (values + self.kappa**2).clamp_min(0).sqrt()

    def extra_repr(self) -> str:
        return f"kappa={self.kappa}, stages={self.stages}, cache={self.cache}"


@hookimpl
def geco_register_constraints(register):
    register(FeatureReconstructionError)
