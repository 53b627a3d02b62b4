"""Training the frozen networks that constraints compare reconstructions with (a digit classifier
for CLA, a ResNet whose early stages FRE keeps): a plain supervised loop on in-memory data.

Adam with a one-cycle learning rate, cross-entropy, batches drawn from a seeded permutation each
epoch; deterministic for a given seed on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geco_core.data.base import ImageData

__all__ = ["train_classifier", "accuracy"]

Transform = Callable[[Tensor], Tensor]


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageData, preprocess: Transform | None = None, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (labels (N,)); pixels in [0, 1], then ``preprocess``."""
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size].float() / 255
        logits = model(preprocess(x) if preprocess else x)
        correct += int((logits.argmax(1) == data.labels[i : i + batch_size]).sum())
    return correct / len(data)


def train_classifier(
    model: nn.Module,
    train: ImageData,
    test: ImageData,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    seed: int = 0,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    perturb: Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor] | None = None,
    mix: Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]] | None = None,
    preprocess: Transform | None = None,
    on_epoch: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
) -> float:
    """Train ``model`` (logits out) on ``train``; returns its test accuracy after the last epoch.

    Each step: pixels in [0, 1] -> ``augment(x, generator)`` -> ``mix(x, labels, generator)`` (a
    batch with some examples replaced, and their labels, e.g. by negatives of an extra class) ->
    ``perturb(model, x, labels, generator)`` (an adversarial or noisy input, pixels in [0, 1]) ->
    ``preprocess`` -> cross-entropy;
    ``on_epoch(epoch)`` after each epoch (e.g. to keep the best weights so far). The
    permutations and augmentations draw from a generator seeded with ``seed``; seed torch's global
    RNG yourself before building ``model`` for a reproducible initialisation.
    """
    g = torch.Generator().manual_seed(seed)
    steps = len(train) // batch_size
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    t0 = time.perf_counter()
    acc = float("nan")
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = train.images[idx].float() / 255
            x = augment(x, g) if augment else x
            y = train.labels[idx]
            x, y = mix(x, y, g) if mix else (x, y)
            x = perturb(model, x, y, g) if perturb else x
            loss = F.cross_entropy(model(preprocess(x) if preprocess else x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, test, preprocess)
        seconds = time.perf_counter() - t0
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, test accuracy {acc:.4%} ({seconds:.0f} s)")
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return acc
