"""geco_core.classifier, the supervised loop the CLA and FRE plugins train their networks with."""

from __future__ import annotations

import torch
from torch import nn

from geco_core.data import ImageData
from geco_core.training import accuracy, train_classifier


def toy(n: int, seed: int) -> ImageData:
    """Two classes: a bright left half or a bright right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=g)
    images = torch.rand(n, 1, 8, 8, generator=g) * 100
    images[labels == 0, :, :, :4] += 150
    images[labels == 1, :, :, 4:] += 150
    return ImageData(images=images.clamp(0, 255).to(torch.uint8), labels=labels)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))


def test_training_learns_and_the_reported_accuracy_is_the_test_accuracy():
    train, test = toy(512, 0), toy(256, 1)
    model = net()
    before = accuracy(model, test)
    lines = []
    acc = train_classifier(model, train, test, epochs=3, lr=1e-2, batch_size=64, log=lines.append)
    assert acc > 0.95 and acc > before and len(lines) == 3
    assert acc == accuracy(model, test)


def test_training_is_deterministic_given_the_seed_and_uses_augment_and_preprocess():
    train, test = toy(256, 0), toy(64, 1)
    seen = []

    def augment(x, g):
        seen.append(x.shape)
        return (x + 0.01 * torch.randn(x.shape, generator=g)).clamp(0, 1)

    def trained(seed: int = 3, preprocess=lambda x: x - 0.5):
        model = net()
        train_classifier(
            model, train, test, epochs=1, lr=1e-2, batch_size=64, seed=seed,
            augment=augment, preprocess=preprocess, log=lambda _: None,
        )  # fmt: skip
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a, b = trained(), trained()
    assert torch.equal(a, b)  # the same seed: the same weights
    assert len(seen) == 2 * (256 // 64)  # augment saw every batch
    assert not torch.equal(a, trained(seed=4))  # the seed draws the order and the augmentation
    assert not torch.equal(a, trained(preprocess=None))  # preprocess is applied


def test_perturb_sees_the_model_the_batch_and_its_labels_and_replaces_the_input():
    train, test = toy(256, 0), toy(256, 1)
    calls = []

    def blank(model, x, y, g):  # every training input blanked: nothing can be learned
        calls.append((model, x.shape, y.shape))
        return torch.zeros_like(x)

    model = net()
    acc = train_classifier(model, train, test, epochs=2, lr=1e-2, batch_size=64, perturb=blank, log=lambda _: None)
    assert len(calls) == 2 * 4 and all(m is model and xs == (64, 1, 8, 8) and ys == (64,) for m, xs, ys in calls)
    assert acc < 0.75  # chance on the balanced toy classes, where clean training reaches > 0.95
