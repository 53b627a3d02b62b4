"""CLA: the shipped classifier re-evaluated on the real MNIST test set, its checksum, the constraint's
values against an independent computation, per-channel digits, and a frozen network that still
passes gradients to the reconstruction."""

from __future__ import annotations

import importlib.metadata
import shutil

import geco_cla.network as network
import pytest
import torch
from geco_cla import ClassifierAccuracy
from safetensors import safe_open

from geco_core import GECO, Batch, ConfigError, create, create_constraint, registry
from geco_core.classifier import accuracy
from geco_core.data import resolve_root
from geco_core.data.mnist import MNIST

needs_mnist = pytest.mark.skipif(
    not all((resolve_root() / "MNIST/raw" / f).is_file() for f in MNIST.files), reason="MNIST not under $GECO_DATA"
)


@pytest.fixture(scope="module")
def mnist_test():
    return create("dataset", "mnist", split="test", download=False)


@needs_mnist
def test_shipped_weights_reproduce_their_recorded_accuracy_on_the_real_test_set(mnist_test):
    with safe_open(str(network.WEIGHTS), "pt") as f:
        recorded = float(f.metadata()["test_accuracy"])
    acc = accuracy(network.load_classifier(), mnist_test)
    assert acc >= 0.99 and acc == pytest.approx(recorded, abs=1e-4)


def test_shipped_weights_are_small_and_checksummed(tmp_path, monkeypatch):
    assert network.WEIGHTS.stat().st_size < 1_000_000
    assert network.sha256(network.WEIGHTS) == network.WEIGHTS_SHA256
    tampered = tmp_path / "mnist_classifier.safetensors"
    shutil.copy(network.WEIGHTS, tampered)
    data = bytearray(tampered.read_bytes())
    data[-10] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(network, "WEIGHTS", tampered)
    with pytest.raises(ConfigError, match="does not match its recorded sha256"):
        network.load_classifier()


def test_a_user_weights_file_of_another_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match="cannot load classifier weights"):
        ClassifierAccuracy(kappa=0.9, weights=str(tmp_path / "w.safetensors"))


@needs_mnist
def test_values_are_kappa_minus_the_probability_of_the_true_class(mnist_test):
    cla = ClassifierAccuracy(kappa=0.9)
    x = mnist_test.images[:32].float() / 255
    x_hat = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    labels = mnist_test.labels[:32]
    values = cla(Batch(x, x_hat, labels=labels))
    with torch.no_grad():  # independently: softmax of the network's logits, indexed by label
        p = torch.softmax(cla.classifier(x_hat), dim=1)[torch.arange(32), labels]
    assert values.shape == (32, 1)
    torch.testing.assert_close(values[:, 0], 0.9 - p)
    torch.testing.assert_close(cla.reached(values)[:, 0], p)
    # no labels: the classifier's prediction on the target stands in
    preds = cla.classifier(x).argmax(1)
    no_labels = cla(Batch(x, x_hat))
    torch.testing.assert_close(no_labels[:, 0], 0.9 - torch.softmax(cla.classifier(x_hat), 1)[torch.arange(32), preds])


@needs_mnist
def test_stacked_digits_are_classified_channel_by_channel(mnist_test):
    cla = create_constraint("cla", kappa=0.8, image_shape=(3, 28, 28))
    assert cla.dim == 3
    x = (mnist_test.images[:30].float() / 255).reshape(10, 3, 28, 28)
    labels = mnist_test.labels[:30].reshape(10, 3)
    values = cla(Batch(x, x, labels=labels))
    single = ClassifierAccuracy(kappa=0.8)
    for c in range(3):
        torch.testing.assert_close(
            values[:, c : c + 1], single(Batch(x[:, c : c + 1], x[:, c : c + 1], labels=labels[:, c]))
        )
    assert GECO([cla]).component_names == ["cla[0]", "cla[1]", "cla[2]"]


def test_the_classifier_is_frozen_but_passes_gradients_to_the_reconstruction():
    cla = ClassifierAccuracy(kappa=0.9)
    geco = GECO([cla])
    geco.train()  # putting GECO in training mode must not wake the classifier's batch norm
    assert not cla.classifier.training and not any(p.requires_grad for p in cla.classifier.parameters())
    x_hat = torch.rand(4, 1, 28, 28, requires_grad=True)
    before = {k: v.clone() for k, v in cla.classifier.state_dict().items()}
    geco(torch.zeros(4), Batch(torch.rand(4, 1, 28, 28), x_hat, labels=torch.tensor([1, 2, 3, 4]))).backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in cla.classifier.parameters())
    assert all(torch.equal(v, before[k]) for k, v in cla.classifier.state_dict().items())  # BN stats too


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kappa=1.0), "kappa must be a probability in \\(0, 1\\)"),
        (dict(kappa=0), "kappa"),
        (dict(kappa=0.9, image_shape=(3, 32, 32)), "reads 28x28 digits"),
        (dict(kappa=0.9, weights="/nonexistent.safetensors"), "no classifier weights at"),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_constraint("cla", **kwargs)


def test_labels_that_do_not_fit_the_channels_are_rejected():
    cla = ClassifierAccuracy(kappa=0.9, image_shape=(3, 28, 28))
    x = torch.rand(2, 3, 28, 28)
    with pytest.raises(ValueError, match="1 label\\(s\\) per example for 3 channel"):
        cla(Batch(x, x, labels=torch.tensor([1, 2])))


def test_found_through_its_installed_entry_point():
    (ep,) = importlib.metadata.entry_points(group="geco", name="cla")
    assert ep.dist.metadata["Name"] == "geco-cla"
    assert registry().get("constraint", "cla").factory is ClassifierAccuracy
