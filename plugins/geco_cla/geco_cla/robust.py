"""Robust training of the CLA classifier, and the attack that measures its robustness.

A constraint judged by a network is met by the cheapest input that network accepts; for a standard
classifier those inputs lie off the data (Tsipras et al. 2019). A classifier trained on perturbed
inputs has gradients closer to what people see (Santurkar et al. 2019), so the shipped CLA network
is trained on one of these recipes (chosen by ``benchmarks/cla_networks.py``):

- ``standard``: clean inputs.
- ``noise``: Gaussian noise ``x + eps * N(0, 1)``, clamped to [0, 1] (the cheapest).
- ``fgsm-rs``: FGSM from a random start (Wong, Rice & Kolter 2020): ``delta ~ U(-eps, eps)``, one
  signed-gradient step of ``1.25 eps``, projected back to the L-inf ball; about twice standard
  training.
- ``pgd``: ``steps`` signed-gradient steps of ``2.5 eps / steps`` from a random start, projected
  to the L-inf ball (Madry et al. 2018); about ``steps + 1`` times standard training.
- ``pgd-l2``: the same in the L2 ball (``|delta|_2 <= eps`` over the 784 pixels): steps along the
  normalised gradient, projected by rescaling; robust models of this norm have the gradients used
  to synthesise images (Santurkar et al. 2019).

Pixels are in [0, 1] throughout; ``eps`` is in pixel units (L-inf, or L2 for ``pgd-l2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RECIPES", "NOT_A_DIGIT", "non_digits", "perturbation", "pgd_attack", "robust_accuracy"]

NOT_A_DIGIT = 10  # the label of the eleventh class of a network trained with non_digits

RECIPES = ("standard", "noise", "fgsm-rs", "pgd", "pgd-l2")


def _uniform(x: Tensor, eps: float, g: torch.Generator | None) -> Tensor:
    return (torch.rand(x.shape, generator=g, device=x.device) * 2 - 1) * eps


def _l2_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (t.dim() - 1))


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    g: torch.Generator | None = None,
    norm: str = "linf",
) -> Tensor:
    """``x + delta`` with ``|delta|_inf <= eps`` (``norm="l2"``: ``|delta|_2 <= eps``) and pixels in
    [0, 1] that raises the cross-entropy of ``y``: a random start, then ``steps`` steps of
    ``step_size`` (default ``2.5 eps / steps``) along the gradient's sign (L2: the gradient over its
    norm), each projected back. ``steps = 1, step_size = 1.25 eps`` is FGSM-RS."""
    step_size = 2.5 * eps / steps if step_size is None else step_size
    delta = _uniform(x, eps, g)
    if norm == "l2":  # a random point of the L2 ball's shell at radius eps * u, u ~ U(0, 1)
        radius = torch.rand(len(x), generator=g, device=x.device).reshape(-1, *[1] * (x.dim() - 1)) * eps
        delta = delta / _l2_norm(delta) * radius
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        if norm == "l2":
            delta = delta.detach() + step_size * grad / _l2_norm(grad)
            delta = delta * (eps / _l2_norm(delta)).clamp(max=1.0)
        else:
            delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def non_digits(x: Tensor, y: Tensor, g: torch.Generator, share: float = 0.25) -> tuple[Tensor, Tensor]:
    """The batch with its first ``share`` of examples made into what a constraint's cheapest inputs
    look like rather than digits, labelled :data:`NOT_A_DIGIT`: in equal parts bold strokes (a 3x3
    or 5x5 max filter), blurred bold blobs, inverted digits (dark strokes on a white field) and flat
    grey fields with noise. Pixels stay in [0, 1]."""
    n = int(len(x) * share)
    if n < 4:
        return x, y
    q = n // 4
    d = x[:n]
    bold = torch.cat([F.max_pool2d(d[: q // 2], 3, 1, 1), F.max_pool2d(d[q // 2 : q], 5, 1, 2)])
    blob = F.avg_pool2d(F.max_pool2d(d[q : 2 * q], 5, 1, 2), 5, 1, 2)
    inverted = 1 - d[2 * q : 3 * q]
    level = torch.rand(n - 3 * q, 1, 1, 1, generator=g)
    field = (level + 0.1 * torch.randn(d[3 * q :].shape, generator=g)).clamp(0, 1)
    x = torch.cat([bold, blob, inverted, field, x[n:]])
    y = torch.cat([torch.full((n,), NOT_A_DIGIT, dtype=y.dtype), y[n:]])
    return x, y


def perturbation(recipe: str, eps: float, pgd_steps: int = 7):
    """The ``perturb(model, x, y, generator)`` of ``train_classifier`` for a recipe of :data:`RECIPES`
    (None for ``standard``)."""
    if recipe == "standard":
        return None
    if recipe == "noise":
        return lambda model, x, y, g: (x + eps * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if recipe == "fgsm-rs":
        return lambda model, x, y, g: pgd_attack(model, x, y, eps, steps=1, step_size=1.25 * eps, g=g)
    if recipe == "pgd":
        return lambda model, x, y, g: pgd_attack(model, x, y, eps, steps=pgd_steps, g=g)
    if recipe == "pgd-l2":
        return lambda model, x, y, g: pgd_attack(model, x, y, eps, steps=pgd_steps, g=g, norm="l2")
    raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")


def robust_accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    eps: float,
    steps: int = 40,
    batch_size: int = 500,
    seed: int = 0,
    norm: str = "linf",
) -> float:
    """Accuracy under :func:`pgd_attack` (``eps`` in ``norm``, ``steps`` steps of ``2.5 eps / steps``);
    ``images`` uint8 ``(N, 1, 28, 28)``. The model is put in eval mode."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(images), batch_size):
        x, y = images[i : i + batch_size].float() / 255, labels[i : i + batch_size]
        adv = pgd_attack(model, x, y, eps, steps, g=g, norm=norm)
        with torch.no_grad():
            correct += int((model(adv).argmax(1) == y).sum())
    return correct / len(images)
