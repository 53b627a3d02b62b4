"""Realism: the Fréchet distance between images and the test data in an independent network's features.

The MNIST-family analogue of FID (Heusel et al. 2017): fit a Gaussian to the features of each set
of images and take ::

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))        (feature units squared)

The statistics and the distance are torchmetrics' ``FrechetInceptionDistance`` (float64), with a
registered feature network in place of Inception (hook ``geco_register_feature_networks``; geco-cla
registers ``digits``, the penultimate layer of a classifier that no shipped constraint uses by
default). The paper ties sample quality to the marginal KL ("holes" in the aggregate posterior);
this measures it directly, for reconstructions and for prior samples. 0 for two sets of the same
distribution up to sampling error, which is of the order of ``Tr(S) / n``; compare distances measured
with the same feature network and the same number of images only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from geco_core.compat import import_torchmetrics_fid
from geco_core.plugins import registry

__all__ = ["feature_network_for", "frechet_distances"]


def feature_network_for(data_name: str, image_shape: tuple[int, int, int]) -> tuple[str, nn.Module] | None:
    """The first registered feature network whose ``datasets`` include ``data_name``, built for
    ``image_shape``, with its name; None where there is none."""
    for name, entry in registry().entries["features"].items():
        if data_name in getattr(entry.factory, "datasets", ()):
            return name, entry.factory(image_shape=image_shape).eval()
    return None


@torch.no_grad()
def frechet_distances(features: nn.Module, real: Iterable[Tensor], **fakes: Iterable[Tensor]) -> dict[str, float]:
    """The Fréchet distance between ``features`` of the ``real`` batches and of each named set of
    ``fakes`` batches (pixels in [0, 1], ``(B, C, H, W)``): ``{name: d^2}``. ``features`` needs an
    integer attribute ``num_features``."""
    fid = import_torchmetrics_fid().FrechetInceptionDistance(
        feature=features, normalize=True, reset_real_features=False
    )
    device = next(features.parameters(), torch.empty(0)).device
    fid = fid.to(device)
    for x in real:
        fid.update(x, real=True)
    out = {}
    for name, batches in fakes.items():
        fid.reset()  # keeps the real features
        for x in batches:
            fid.update(x, real=False)
        out[name] = float(fid.compute())
    return out
