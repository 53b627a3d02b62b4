"""FRE: values against a float64 computation from the safetensors file through a fresh timm model,
the shipped stages' recorded probe accuracy on the real test set, the target-feature cache, channel
handling, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import geco_fre.network as network
import pytest
import torch
from geco_fre import FeatureReconstructionError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from geco_core import GECO, Batch, ConfigError, create, create_constraint
from geco_core.compat import import_timm
from geco_core.data import resolve_root
from geco_core.data.mnist import FASHION_MNIST
from geco_core.weights import sha256

needs_fashion = pytest.mark.skipif(
    not all((resolve_root() / "FashionMNIST/raw" / f).is_file() for f in FASHION_MNIST.files),
    reason="Fashion-MNIST not under $GECO_DATA",
)


def metadata() -> dict[str, str]:
    with safe_open(str(network.WEIGHTS), "pt") as f:
        return f.metadata()


def reference(x: torch.Tensor, x_hat: torch.Tensor, kappa: float, stages=(0, 1)) -> torch.Tensor:
    """float64, the network rebuilt from the file; per-example mean over stages of mean squared error."""
    body = import_timm().create_model("resnet18", features_only=True, out_indices=stages, in_chans=1)
    body.load_state_dict({k: v for k, v in load_file(str(network.WEIGHTS)).items() if k in body.state_dict()})
    body = body.double().eval()
    mean, std = float(metadata()["mean"]), float(metadata()["std"])
    b, c = x.shape[:2]
    with torch.no_grad():
        f = body((x.reshape(b * c, 1, *x.shape[2:]).double() - mean) / std)
        g = body((x_hat.reshape(b * c, 1, *x.shape[2:]).double() - mean) / std)
    per_stage = [((fs - gs) ** 2).reshape(b, -1).mean(1) for fs, gs in zip(f, g)]
    return (sum(per_stage) / len(per_stage) - kappa**2).unsqueeze(1)


def images(seed: int, shape=(6, 1, 28, 28)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    return x, (x + 0.2 * torch.randn(shape, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("stages", [(0, 1), (1,), (0,)])
def test_values_match_a_float64_reference(stages):
    x, x_hat = images(0)
    fre = FeatureReconstructionError(kappa=0.3, stages=stages).double()
    got = fre(Batch(x.double(), x_hat.double()))
    torch.testing.assert_close(got, reference(x, x_hat, 0.3, stages), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fre.reached(got), (got + 0.09).sqrt())


def test_colour_images_are_read_channel_by_channel_and_averaged():
    x, x_hat = images(1, (4, 3, 28, 28))
    fre = FeatureReconstructionError(kappa=0.3).double()
    got = fre(Batch(x.double(), x_hat.double()))
    per_channel = [reference(x[:, c : c + 1], x_hat[:, c : c + 1], 0.0) for c in range(3)]
    torch.testing.assert_close(got, sum(per_channel) / 3 - 0.09, rtol=1e-9, atol=1e-9)


def test_a_three_channel_network_reads_grey_images_repeated(tmp_path):
    torch.manual_seed(0)
    body = import_timm().create_model("resnet18", num_classes=10, in_chans=3)
    path = tmp_path / "rgb.safetensors"
    save_file(
        {k: v.contiguous() for k, v in body.state_dict().items() if k.startswith(("conv1.", "bn1.", "layer1."))},
        str(path),
        metadata={"arch": "resnet18", "mean": "0.5", "std": "0.25"},
    )
    fre = FeatureReconstructionError(kappa=0.3, weights=str(path))
    assert fre.features.in_chans == 3
    x, x_hat = images(2, (3, 1, 28, 28))
    grey = fre(Batch(x, x_hat))
    rgb = fre(Batch(x.expand(3, 3, 28, 28), x_hat.expand(3, 3, 28, 28)))
    torch.testing.assert_close(grey, rgb)


@needs_fashion
def test_shipped_stages_reproduce_their_recorded_probe_accuracy_on_the_real_test_set():
    train = create("dataset", "fashion-mnist", split="train", download=False)
    test = create("dataset", "fashion-mnist", split="test", download=False)
    recorded = float(metadata()["probe_accuracy"])
    acc = network.probe_accuracy(network.build_feature_network(), train, test)
    assert acc == pytest.approx(recorded, abs=1e-4) and acc > 0.4  # ten classes: chance is 0.1
    assert float(metadata()["test_accuracy"]) > 0.85  # the whole classifier's, recorded when trained


@pytest.mark.parametrize("name", ["shipped", "twin"])
def test_shipped_weights_are_small_and_checksummed(tmp_path, monkeypatch, name):
    path, digest = network.SHIPPED[name]
    assert path.stat().st_size < 1_000_000
    assert sha256(path) == digest
    assert metadata()["arch"] == "resnet18" and metadata()["stages"] == "0,1"
    monkeypatch.setitem(network.SHIPPED, name, (path, "0" * 64))
    with pytest.raises(ConfigError, match="does not match its recorded sha256"):
        FeatureReconstructionError(kappa=0.3, weights=name)


def test_stages_that_were_not_shipped_are_refused():
    with pytest.raises(ConfigError, match="keeps stages 0,1, not all of \\(0, 2\\)"):
        FeatureReconstructionError(kappa=0.3, stages=(0, 2))


def test_the_cache_gives_the_same_values_and_skips_the_target_pass(monkeypatch):
    x, x_hat = images(3, (8, 1, 28, 28))
    plain = FeatureReconstructionError(kappa=0.3)
    cached = FeatureReconstructionError(kappa=0.3, cache=True).train()
    index = torch.arange(100, 108)
    first = cached(Batch(x, x_hat, index=index))
    calls = []
    real = cached._features
    monkeypatch.setattr(cached, "_features", lambda t: calls.append(len(t)) or real(t))
    second = cached(Batch(x, x_hat, index=index))
    assert calls == [8]  # only the reconstructions went through the network
    want = plain(Batch(x, x_hat))
    torch.testing.assert_close(first, want)  # the filling pass used fresh features
    torch.testing.assert_close(second, want, rtol=0, atol=2e-3)  # later passes: float16 targets
    assert len(cached._filled) >= 108 and int(cached._filled.sum()) == 8


def test_the_cache_is_not_used_in_eval_mode_nor_saved():
    x, x_hat = images(4, (4, 1, 28, 28))
    fre = FeatureReconstructionError(kappa=0.3, cache=True)
    geco = GECO([fre])
    geco.train()
    geco(torch.zeros(4), Batch(x, x_hat, index=torch.arange(4)))
    geco.eval()
    other = images(5, (4, 1, 28, 28))[0]  # held-out images with the same indices
    values = fre(Batch(other, x_hat, index=torch.arange(4)))
    torch.testing.assert_close(values, FeatureReconstructionError(kappa=0.3)(Batch(other, x_hat)))
    assert not any("cache" in k or "filled" in k for k in geco.state_dict())


def test_timm_pretrained_weights_without_network_fail_clearly():
    # offline, as a user without network runs it (huggingface_hub reads HF_HUB_OFFLINE at import)
    code = (
        "from geco_core import ConfigError, create_constraint\n"
        "try:\n    create_constraint('fre', kappa=0.3, weights='timm')\n"
        "except ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "fre: cannot get timm's pretrained 'resnet18'" in out.stdout
    assert 'use weights = "shipped" or a safetensors file' in out.stdout


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kappa=0), "kappa must be a feature RMSE > 0"),
        (dict(kappa=0.3, stages=(7,)), "stages must be ResNet stage indices"),
        (dict(kappa=0.3, weights="/nonexistent.safetensors"), "no feature weights at"),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_constraint("fre", **kwargs)
