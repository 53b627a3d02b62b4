"""The digit classifier c(x) of the CLA constraint: a small convolutional network, and its weights.

Four 3x3 convolutions (32, 32, 64, 64 channels) with batch norm and ReLU, two 2x2 max-pools, global
average pooling and a linear layer to 10 logits: 66k parameters, 28x28 inputs with pixels in [0, 1].
Six shipped weight files, each trained by ``python -m geco_cla.train`` (the README gives the commands
and accuracies) and verified against its sha256 when loaded (:data:`SHIPPED`): the robust network CLA
uses by default (PGD in the L2 ball, eps 2) and its twin (``--seed 1``); the earlier L-inf robust pair
(FGSM with a random start, eps 0.3); the standard pair, judges of another recipe
(:meth:`ClassifierAccuracy.judges`).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from geco_core import ConfigError, freeze
from geco_core.weights import load_safetensors

__all__ = ["DigitClassifier", "DigitFeatures", "load_classifier", "WEIGHTS", "WEIGHTS_SHA256", "SHIPPED"]

WEIGHTS = Path(__file__).with_name("mnist_classifier_l2.safetensors")
WEIGHTS_SHA256 = "2f5f4087154f9ed87510a216d591c4ac22da89fbf73729569767f5261f7c21ac"
#: the shipped classifiers by name -> (file, sha256), in pairs of a network and its twin (the same
#: recipe, seed 1): the L2-robust one CLA uses by default, the L-inf robust one (the default of
#: 0.4.0), the standard (non-robust) one. The standard twin is also the feature network of the
#: realism measure (``DigitFeatures``).
SHIPPED = {
    "shipped": (WEIGHTS, WEIGHTS_SHA256),
    "twin": (
        WEIGHTS.with_name("mnist_classifier_l2_twin.safetensors"),
        "0876aad08a683b91b0beaf7f37736fba2ef750b62f9e10f893bbca2b290bf662",
    ),
    "linf": (
        WEIGHTS.with_name("mnist_classifier_linf.safetensors"),
        "59fd842deaa19d42dff5c7c171f04c530a8bd050f04ee65bed126c4f9b31cfe8",
    ),
    "linf-twin": (
        WEIGHTS.with_name("mnist_classifier_linf_twin.safetensors"),
        "c9b797a2d01e04c2eccf2c1e78772cf3506b8924ec14f79f4588fb8e420c3bc4",
    ),
    "standard": (
        WEIGHTS.with_name("mnist_classifier.safetensors"),
        "44ea8dd728d21467decae66bf08a5019483f09fee3cf31f67da67099a98ef9df",
    ),
    "standard-twin": (
        WEIGHTS.with_name("mnist_classifier_twin.safetensors"),
        "0d7e805774f6002c3f429e4cf0a94d88fbcf95ae62d868efeda868ae63880d1d",
    ),
}
MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics, pixels in [0, 1]


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitClassifier(nn.Module):
    """``(B, 1, 28, 28)`` pixels in [0, 1] -> ``(B, classes)`` logits: the ten digits, and where
    ``classes = 11`` an eleventh, "not a digit" (a network trained to reject off-data images)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_block(1, 32), *_block(32, 32), nn.MaxPool2d(2), *_block(32, 64), *_block(64, 64), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features((x - MEAN) / STD))


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """A shipped classifier by name (:data:`SHIPPED`; ``None`` is ``"shipped"``, the L2-robust one),
    checksum verified, or the weights at ``path`` (safetensors, same architecture, e.g. trained by
    ``python -m geco_cla.train --dataset fashion-mnist``)."""
    file, sha = SHIPPED.get(str(path or "shipped"), (Path(str(path)), None))
    if sha is None and not file.is_file():
        names = ", ".join(SHIPPED)
        raise ConfigError(f"cla: weights {str(path)!r} is neither a shipped classifier ({names}) nor a file")
    state, _ = load_safetensors(file, owner="cla", sha256_expected=sha, distribution="geco-cla")
    head = state.get("head.2.weight")
    model = DigitClassifier(classes=head.shape[0] if head is not None else 10)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"cla: cannot load classifier weights from {path}: {str(exc).splitlines()[0]}") from None
    return model.eval()


class DigitFeatures(nn.Module):
    """Realism features of MNIST-family images: the 64 pooled features before the last layer of
    the standard twin classifier (which no constraint uses by default), channel by channel:
    ``(B, C, 28, 28)`` pixels in [0, 1] -> ``(B, 64 C)``."""

    name = "digits"
    datasets = ("mnist", "color-mnist", "mnist-triplets", "mnist-rotate", "mnist-sum", "mnist-sumhard")

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28)) -> None:
        super().__init__()
        channels, h, w = image_shape
        if (h, w) != (28, 28):
            raise ConfigError(f"digits features: read 28x28 digits, but the images are {tuple(image_shape)}")
        self.classifier = freeze(load_classifier("standard-twin"))
        self.num_features = 64 * channels

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        net = self.classifier  # its head without the last layer: pool, flatten
        return net.head[:2](net.features((x.reshape(b * c, 1, h, w) - MEAN) / STD)).reshape(b, c * 64)
