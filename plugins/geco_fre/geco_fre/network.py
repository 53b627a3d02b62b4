"""The feature network f of the FRE constraint: the early stages of a timm ResNet.

``timm.create_model(arch, features_only=True, out_indices=stages)`` builds the network and returns
the feature maps of the chosen stages (for ``resnet18``: 0 = after the stem's first convolution,
stride 2, 64 channels; 1 = after ``layer1``, stride 4, 64 channels; 2-4 the later layers). Weights:

- ``"shipped"``: a ``resnet18`` with one input channel trained on Fashion-MNIST by
  ``python -m geco_fre.train``; only ``conv1``, ``bn1`` and ``layer1`` are shipped (stages 0 and 1),
  verified against ``WEIGHTS_SHA256``;
- ``"twin"``: the same, trained with ``--seed 1``: the independent judge of summaries
  (:meth:`FeatureReconstructionError.twin`);
- ``"timm"``: timm's pretrained ImageNet weights for ``arch`` (three input channels), where the
  network allows the download;
- a path to a safetensors file with the (kept stages') weights of ``arch``.

Inputs are pixels in [0, 1]; the network normalises them with the mean and standard deviation its
weights were trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from geco_core import ConfigError
from geco_core.compat import import_timm
from geco_core.weights import load_safetensors

__all__ = ["FeatureNetwork", "build_feature_network", "probe_accuracy", "WEIGHTS", "WEIGHTS_SHA256", "SHIPPED"]

WEIGHTS = Path(__file__).with_name("fashion_resnet18_stages.safetensors")
WEIGHTS_SHA256 = "e3021eac64bc0eaea047976e3ed532d3ee816a305fa10699beaf9584c8ef6717"
TWIN_SHA256 = "8c6fb96376468980730cf4e2747486c20fb2daa3c8d81de7cb3e0c6365e83e9a"
#: the shipped stages by name: those FRE uses, and their twin (the same recipe, seed 1)
SHIPPED = {
    "shipped": (WEIGHTS, WEIGHTS_SHA256),
    "twin": (WEIGHTS.with_name("fashion_resnet18_stages_twin.safetensors"), TWIN_SHA256),
}
IMAGENET = ((0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3)  # grey-level mean and std


class FeatureNetwork(nn.Module):
    """``x`` in [0, 1] -> the list of feature maps of the kept stages; ``in_chans`` channels in."""

    def __init__(self, body: nn.Module, in_chans: int, mean: float, std: float) -> None:
        super().__init__()
        self.body, self.in_chans, self.mean, self.std = body, in_chans, float(mean), float(std)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.body((x - self.mean) / self.std)


def build_feature_network(weights: str = "shipped", arch: str = "resnet18", stages=(0, 1)) -> FeatureNetwork:
    """The frozen-to-be feature network; see the module docstring for ``weights``."""
    timm = import_timm()
    stages = tuple(int(s) for s in stages)
    if weights == "timm":
        try:
            body = timm.create_model(arch, pretrained=True, features_only=True, out_indices=stages)
        except Exception as exc:  # noqa: BLE001 - no network, unknown arch, ...
            raise ConfigError(
                f"fre: cannot get timm's pretrained {arch!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                'use weights = "shipped" or a safetensors file'
            ) from None
        return FeatureNetwork(body, 3, *IMAGENET)
    path, sha = SHIPPED.get(weights, (Path(weights), None))
    if not path.is_file():
        raise ConfigError(f"fre: no feature weights at {path} (weights is 'shipped', 'twin', 'timm' or a file)")
    state, meta = load_safetensors(path, owner="fre", sha256_expected=sha, distribution="geco-fre")
    if "conv1.weight" not in state:
        raise ConfigError(f"fre: {path} holds no ResNet stem (conv1.weight)")
    in_chans = state["conv1.weight"].shape[1]
    try:
        body = timm.create_model(meta.get("arch", arch), features_only=True, out_indices=stages, in_chans=in_chans)
        missing = set(body.state_dict()) - set(state)
        if missing:
            kept = meta.get("stages", "?")
            raise ConfigError(f"fre: {path} keeps stages {kept}, not all of {stages} (missing {sorted(missing)[0]})")
        body.load_state_dict({k: v for k, v in state.items() if k in body.state_dict()})
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"fre: cannot load {path} into {arch!r}: {str(exc).splitlines()[0]}") from None
    return FeatureNetwork(body, in_chans, float(meta.get("mean", 0.5)), float(meta.get("std", 0.25)))


@torch.no_grad()
def probe_accuracy(net: FeatureNetwork, train, test, n_train: int = 10_000) -> float:
    """How well the kept stages separate the classes on their own: a nearest-class-mean classifier on
    their globally averaged feature maps (class means from the first ``n_train`` training images),
    scored on the whole test set. Deterministic; recorded with the shipped weights."""

    def pooled(images: Tensor) -> Tensor:
        out = []
        for i in range(0, len(images), 1000):
            x = images[i : i + 1000].float() / 255
            out.append(torch.cat([f.mean((2, 3)) for f in net(x)], 1))
        return torch.cat(out)

    net.eval()
    feats, labels = pooled(train.images[:n_train]), train.labels[:n_train]
    means = torch.stack([feats[labels == k].mean(0) for k in range(int(labels.max()) + 1)])
    predicted = torch.cdist(pooled(test.images), means).argmin(1)
    return float((predicted == test.labels).float().mean())
