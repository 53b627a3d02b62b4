"""The digit classifier c(x) of the CLA constraint: a small convolutional network, and its weights.

Four 3x3 convolutions (32, 32, 64, 64 channels) with batch norm and ReLU, two 2x2 max-pools, global
average pooling and a linear layer to 10 logits: 66k parameters, 28x28 inputs with pixels in [0, 1].
The shipped weights were trained by ``python -m geco_cla.train`` (see the README for the command and
the accuracy) and are verified against ``WEIGHTS_SHA256`` when loaded; so is the twin's (``--seed
1``), the independent judge summaries use (:meth:`ClassifierAccuracy.twin`).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from geco_core import ConfigError
from geco_core.weights import load_safetensors

__all__ = ["DigitClassifier", "load_classifier", "WEIGHTS", "WEIGHTS_SHA256", "SHIPPED"]

WEIGHTS = Path(__file__).with_name("mnist_classifier.safetensors")
WEIGHTS_SHA256 = "44ea8dd728d21467decae66bf08a5019483f09fee3cf31f67da67099a98ef9df"
TWIN_SHA256 = "0d7e805774f6002c3f429e4cf0a94d88fbcf95ae62d868efeda868ae63880d1d"
#: the shipped classifiers by name: the one CLA uses, and its twin (the same recipe, seed 1)
SHIPPED = {
    "shipped": (WEIGHTS, WEIGHTS_SHA256),
    "twin": (WEIGHTS.with_name("mnist_classifier_twin.safetensors"), TWIN_SHA256),
}
MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics, pixels in [0, 1]


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitClassifier(nn.Module):
    """``(B, 1, 28, 28)`` pixels in [0, 1] -> ``(B, 10)`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_block(1, 32), *_block(32, 32), nn.MaxPool2d(2), *_block(32, 64), *_block(64, 64), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features((x - MEAN) / STD))


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (``None`` or ``"shipped"``) or its twin (``"twin"``), checksums
    verified, or the weights at ``path`` (safetensors, same architecture, e.g. trained by
    ``python -m geco_cla.train --dataset fashion-mnist``)."""
    file, sha = SHIPPED.get(str(path or "shipped"), (Path(str(path)), None))
    state, _ = load_safetensors(file, owner="cla", sha256_expected=sha, distribution="geco-cla")
    model = DigitClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"cla: cannot load classifier weights from {path}: {str(exc).splitlines()[0]}") from None
    return model.eval()
