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
@pytest.mark.parametrize("name", ["shipped", "standard"])
def test_shipped_weights_reproduce_their_recorded_accuracy_on_the_real_test_set(mnist_test, name):
    path, _ = network.SHIPPED[name]
    with safe_open(str(path), "pt") as f:
        recorded = float(f.metadata()["test_accuracy"])
    acc = accuracy(network.load_classifier(name), mnist_test)
    assert acc >= 0.98 and acc == pytest.approx(recorded, abs=1e-4)


@needs_mnist
@pytest.mark.slow
@pytest.mark.parametrize("name, eps, norm, least", [("shipped", 2.0, "l2", 0.65), ("linf", 0.3, "linf", 0.8)])
def test_the_robust_networks_are_robust_where_the_standard_one_is_not(mnist_test, name, eps, norm, least):
    """A 40-step PGD attack on 500 test digits in each robust network's norm at its training eps
    (the default: L2 2.0; the L-inf pair: 0.3): the robust network keeps most of them, the standard
    one few; and the attack is real (it respects the ball and the pixel range)."""
    from geco_cla.robust import pgd_attack, robust_accuracy

    x, y = mnist_test.images[:500], mnist_test.labels[:500]
    robust = robust_accuracy(network.load_classifier(name), x, y, eps, norm=norm)
    standard = robust_accuracy(network.load_classifier("standard"), x, y, eps, norm=norm)
    assert robust >= least and standard <= 0.2
    clean = x[:20].float() / 255
    adv = pgd_attack(network.load_classifier("standard"), clean, y[:20], eps, steps=5, norm=norm)
    size = (adv - clean).flatten(1).norm(dim=1) if norm == "l2" else (adv - clean).abs().flatten(1).amax(1)
    assert size.max() <= eps + 1e-5 and adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("name", list(network.SHIPPED))
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
        (dict(kappa=0.9, weights="/nonexistent.safetensors"), "neither a shipped classifier .*linf.* nor a file"),
        (dict(kappa=0.9, weights="Linf"), "cla: weights 'Linf' is neither a shipped classifier"),
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


@needs_mnist
def test_judges_are_the_twin_and_the_other_recipe_and_summaries_count_those_met(tmp_path):
    """Held-out values under each judge equal the judge constraint computed independently on the
    same reconstructions; the row says under how many judges the constraint is met."""
    from geco_core.training import Config, build
    from geco_core.training.experiment import evaluate_heldout, evaluating
    from geco_core.training.summary import constraint_rows

    cla = ClassifierAccuracy(kappa=0.5)
    assert list(cla.judges()) == ["twin", "standard", "standard twin"]
    assert [j.weights for j in cla.judges().values()] == ["twin", "standard", "standard-twin"]
    standard = ClassifierAccuracy(kappa=0.5, weights="standard")
    assert [j.weights for j in standard.judges().values()] == ["standard-twin", "shipped", "twin"]
    assert list(standard.judges()) == ["twin", "robust", "robust twin"]
    linf = ClassifierAccuracy(kappa=0.5, weights="linf")
    assert [j.weights for j in linf.judges().values()] == ["linf-twin", "standard", "standard-twin"]
    assert ClassifierAccuracy(kappa=0.5, weights=str(network.SHIPPED["standard"][0])).judges() == {}

    config = Config.from_dict(
        {
            "data": {"name": "mnist"},
            "model": {"name": "conv-vae", "latent_dim": 4},
            "constraints": [{"name": "cla", "kappa": 0.5}],
            "train": {"validation": 0},
            "logging": {"progress": False},
        }
    )
    exp = build(config)
    _, data = exp.heldout
    names = list(cla.judges())
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    assert list(exp.judges[0]) == names and torch.equal(torch.get_rng_state(), rng)  # building them draws nothing
    held = evaluate_heldout(exp, data, 48)
    torch.manual_seed(3)
    batch = data.batch(torch.arange(48))
    with evaluating(exp.model), torch.no_grad():
        recon = Batch(batch.x, exp.forward(batch).x_hat, labels=batch.labels)
    for name, judge in cla.judges().items():
        torch.testing.assert_close(held["judge_means"][0][name], judge(recon).mean(0), rtol=1e-5, atol=1e-5)
    (row,) = constraint_rows(exp, held)
    statuses = [j.status for j in row.judges]
    assert [j.name for j in row.judges] == ["twin", "standard", "standard twin"]
    assert statuses == ["met" if j.value <= 0 else "violated" for j in row.judges]
    written = row.to_json()
    assert written["judges_met"] == row.judges_met == statuses.count("met") and written["twin_status"] == statuses[0]
    with torch.no_grad():  # the data themselves: the geometric mean of p(true digit | x) on the same digits
        log_p = torch.log_softmax(cla.classifier(batch.x), 1).gather(1, batch.labels.long().reshape(-1, 1))
    assert row.data_reached == pytest.approx(float(log_p.mean().exp()), rel=1e-4)
    assert row.beyond_data == (0.5 > row.data_reached)
    line = row.judges_line()
    assert line.startswith(f"cla: {'met' if row.heldout_value <= 0 else 'not met'} under its own network")
    assert f"met under {row.judges_met} of 3 independent judges" in line


@pytest.mark.parametrize("recipe", ["noise", "fgsm-rs", "pgd", "pgd-l2"])
def test_training_perturbations_stay_in_the_pixel_range_and_the_attacks_in_their_ball(recipe):
    from geco_cla.robust import perturbation

    torch.manual_seed(0)
    model = network.DigitClassifier().eval()
    x = torch.rand(8, 1, 28, 28)
    y = torch.randint(10, (8,))
    eps = 1.0 if recipe == "pgd-l2" else 0.1  # an L2 radius over 784 pixels, or L-inf
    out = perturbation(recipe, eps, pgd_steps=3)(model, x, y, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    if recipe == "pgd-l2":
        assert (out - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
        assert (out - x).abs().max() > 0.1  # not an L-inf ball of the same size in disguise
    if recipe != "noise":
        assert (out - x).abs().max() <= (1.0 if recipe == "pgd-l2" else eps + 1e-6)
        loss = torch.nn.functional.cross_entropy
        with torch.no_grad():
            assert loss(model(out), y) > loss(model(x), y)  # an attack raises the loss
    assert perturbation("standard", 0.1) is None
    with pytest.raises(ValueError, match="unknown recipe"):
        perturbation("trades", 0.1)


def test_non_digits_replace_a_share_of_the_batch_with_labelled_negatives():
    """The reject class's negatives: a quarter of the batch, labelled "not a digit", each kind what its
    name says (bold strokes cover more pixels than the digit, an inverted digit is 1 - x), pixels
    in [0, 1]; the rest of the batch untouched."""
    from geco_cla.robust import NOT_A_DIGIT, non_digits

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(32, 1, 28, 28, generator=g) > 0.8).float()  # sparse strokes
    y = torch.randint(10, (32,), generator=g)
    out, labels = non_digits(x, y, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert labels[:8].eq(NOT_A_DIGIT).all() and torch.equal(labels[8:], y[8:]) and torch.equal(out[8:], x[8:])
    assert (out[:2] >= x[:2]).all() and out[:2].mean() > 2 * x[:2].mean()  # bold: dilated strokes
    torch.testing.assert_close(out[4:6], 1 - x[4:6])  # inverted
    assert torch.equal(non_digits(x[:3], y[:3], g)[0], x[:3])  # too few to replace: the batch as it is


def test_smoothing_classifies_the_reconstruction_plus_fresh_noise_and_judges_see_it_as_it_is():
    cla = ClassifierAccuracy(kappa=0.9, smoothing=0.3)
    x = torch.rand(6, 1, 28, 28)
    labels = torch.arange(6)
    torch.manual_seed(5)
    values = cla(Batch(x, x, labels=labels))
    torch.manual_seed(5)
    noisy = x + 0.3 * torch.randn_like(x)
    with torch.no_grad():
        log_p = torch.log_softmax(cla.classifier(noisy).double(), 1)[torch.arange(6), labels]
    torch.testing.assert_close(values[:, 0].double(), math.log(0.9) - log_p, rtol=1e-5, atol=1e-5)
    assert not torch.equal(values, cla(Batch(x, x, labels=labels)))  # a fresh draw each call
    assert all(j.smoothing == 0 for j in cla.judges().values())
    with pytest.raises(ConfigError, match="smoothing must be a noise std"):
        ClassifierAccuracy(kappa=0.9, smoothing=-0.1)


def test_cla_follows_gecos_validation_confidence_unless_it_is_given_its_own():
    """In a stack of RE and CLA, GECO's ``validation_confidence`` bounds both validation means,
    except where CLA is given its own (``[[constraints]] validation_confidence``)."""
    values = torch.randn(200, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for own, z in ((None, [2.5, 2.5]), (0.7, [2.5, 0.7])):
        options = {} if own is None else {"validation_confidence": own}
        stack = [create_constraint("re", kappa=0.2), create_constraint("cla", kappa=0.9, **options)]
        geco = GECO(stack, controller="paper", alpha=0.0, validation_confidence=2.5, dtype=torch.float64)
        geco.validate(values)
        expected = values.mean(0) + torch.tensor(z, dtype=torch.float64) * values.std(0) / math.sqrt(200)
        torch.testing.assert_close(geco.gap, expected)
