"""CLA: the shipped classifier re-evaluated on the real MNIST test set, its checksum, the constraint's
values against an independent computation, per-channel digits, and a frozen network that still
passes gradients to the reconstruction."""

from __future__ import annotations

import math
import shutil

import geco_cla.network as network
import pytest
import torch
from geco_cla import ClassifierAccuracy
from safetensors import safe_open

from geco_core import GECO, Batch, ConfigError, create, create_constraint
from geco_core.data import resolve_root
from geco_core.data.mnist import MNIST
from geco_core.training import accuracy
from geco_core.weights import sha256

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


@pytest.mark.parametrize("name", ["shipped", "twin"])
def test_shipped_weights_are_small_and_checksummed(tmp_path, monkeypatch, name):
    path, digest = network.SHIPPED[name]
    assert path.stat().st_size < 1_000_000
    assert sha256(path) == digest
    tampered = tmp_path / path.name
    shutil.copy(path, tampered)
    data = bytearray(tampered.read_bytes())
    data[-10] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setitem(network.SHIPPED, name, (tampered, digest))
    with pytest.raises(ConfigError, match="does not match its recorded sha256"):
        network.load_classifier(name)


def test_a_user_weights_file_of_another_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match="cannot load classifier weights"):
        ClassifierAccuracy(kappa=0.9, weights=str(tmp_path / "w.safetensors"))


@needs_mnist
@pytest.mark.parametrize("form", ["log", "probability"])
def test_values_are_kappa_against_the_probability_of_the_true_class(mnist_test, form):
    cla = ClassifierAccuracy(kappa=0.9, form=form)
    x = mnist_test.images[:32].float() / 255
    x_hat = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    labels = mnist_test.labels[:32]
    values = cla(Batch(x, x_hat, labels=labels))

    def expected(p: torch.Tensor) -> torch.Tensor:  # float64, from the probability alone
        p = p.double()
        return (math.log(0.9) - p.log()) if form == "log" else 0.9 - p

    with torch.no_grad():  # independently: softmax of the network's logits, indexed by label
        p = torch.softmax(cla.classifier(x_hat).double(), dim=1)[torch.arange(32), labels]
    assert values.shape == (32, 1)
    torch.testing.assert_close(values[:, 0].double(), expected(p), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cla.reached(values)[:, 0].double(), p, rtol=1e-5, atol=1e-5)
    assert torch.equal(values[:, 0] <= 0, p >= 0.9)
    # no labels: the classifier's prediction on the target stands in
    preds = cla.classifier(x).argmax(1)
    no_labels = cla(Batch(x, x_hat))
    with torch.no_grad():
        p_pred = torch.softmax(cla.classifier(x_hat).double(), 1)[torch.arange(32), preds]
    torch.testing.assert_close(no_labels[:, 0].double(), expected(p_pred), rtol=1e-5, atol=1e-5)


def test_the_log_form_keeps_a_gradient_where_the_probability_form_has_almost_none():
    torch.manual_seed(0)
    x = torch.zeros(1, 1, 28, 28)
    grads = {}
    for form in ("log", "probability"):
        cla = ClassifierAccuracy(kappa=0.9, form=form)
        x_hat = torch.zeros(1, 1, 28, 28, requires_grad=True)  # a blank image: no digit at all
        label = cla.classifier(torch.zeros(1, 1, 28, 28)).argmin(1)  # the class it finds least likely
        cla(Batch(x, x_hat, labels=label)).sum().backward()
        grads[form] = x_hat.grad.norm().item()
    assert grads["log"] > 100 * grads["probability"] > 0


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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kappa=1.0), "kappa must be a probability in \\(0, 1\\)"),
        (dict(kappa=0), "kappa"),
        (dict(kappa=0.9, image_shape=(3, 32, 32)), "reads 28x28 digits"),
        (dict(kappa=0.9, weights="/nonexistent.safetensors"), "cla: no weights at"),
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
