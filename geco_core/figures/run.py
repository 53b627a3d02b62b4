"""A run's figures: its training trajectory (the paper's Figure 1) and image grids (Figure 3), one
run's or several side by side. The figures of many runs are in :mod:`geco_core.figures.runs`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from geco_core.state import ComponentState, key

__all__ = ["plot_trajectory", "save_grid", "save_grids", "as_displayable", "pyplot", "save_figure"]


def pyplot():
    """matplotlib's pyplot on the Agg backend (no screen needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, **savefig) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and release it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **savefig)
    pyplot().close(fig)
    return path


def plot_trajectory(
    records: Sequence[dict[str, float]], components: Sequence[ComponentState], path: Path, title: str = ""
) -> Path:
    """Figure 1 of the paper for one run, iteration encoded by colour in every panel:
    the information plane (KL vs pixel RMSE), each constraint component's reached value against its
    kappa line, the equivalent beta (= 1/lambda for GECO), and the KL over training.

    ``components``: GECO's state of the components (:class:`~geco_core.state.ComponentState`);
    those whose reached value was logged get a panel. Without any, beta is the objective's."""
    plt = pyplot()
    steps = [r["step"] for r in records]
    last = records[-1] if records else {}
    shown = [c for c in components if key(c.name, "reached") in last]
    betas = [key(c.name, "beta") for c in components if key(c.name, "beta") in last] or ["beta"]
    panels = 3 + len(shown)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), squeeze=False, layout="constrained")
    axes = list(axes[0])
    style = dict(c=steps, cmap="viridis", s=8)

    def series(name: str) -> list[float]:
        return [r.get(name, float("nan")) for r in records]

    ax = axes.pop(0)
    points = ax.scatter(series("kl"), series("rmse"), **style)
    ax.set(xlabel="KL (nats)", ylabel="pixel RMSE", title="information plane", yscale="log")
    for c in shown:
        ax = axes.pop(0)
        ax.scatter(steps, series(key(c.name, "reached")), **style)
        label = f"κ = {c.kappa:g}" + (c.also.format(c.kappa) if c.also else "")
        ax.axhline(c.kappa, color="crimson", ls="--", lw=1, label=label)
        ax.legend(loc="best")
        ax.set(xlabel="iteration", ylabel="reached (moving average)", title=f"constraint {c.name}")
        if c.also:  # the second unit on the right, e.g. PSNR in dB beside the pixel RMSE
            numpy = _numpy_of(c.also)
            ax.secondary_yaxis("right", functions=numpy).set_ylabel(f"{c.also.name} ({c.also.symbol})")
    ax = axes.pop(0)
    for name in betas:
        ax.scatter(steps, series(name), **style)
    label = "β = 1/λ" if betas != ["beta"] else "β"
    ax.set(xlabel="iteration", ylabel=label, title=f"equivalent {label}", yscale="log")
    ax = axes.pop(0)
    ax.scatter(steps, series("kl"), **style)
    ax.set(xlabel="iteration", ylabel="KL (nats)", title="KL")
    fig.colorbar(points, ax=fig.axes, label="iteration", shrink=0.9)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


def as_displayable(images: Tensor) -> Tensor:
    """Images with 1 or 3 channels as they are; other channel counts side by side in grey."""
    b, c, h, w = images.shape
    if c in (1, 3):
        return images
    return images.permute(0, 2, 1, 3).reshape(b, 1, h, c * w)


def _grid_image(rows: Sequence[Tensor]) -> Tensor:
    """One grid image ``(3, H, W)`` with a row per tensor, pixels in [0, 1]."""
    from geco_core.compat import import_torchvision

    torchvision = import_torchvision()

    rows = [as_displayable(r.detach().float().cpu().clamp(0, 1)) for r in rows]
    channels = max(r.shape[1] for r in rows)
    height, width = max(r.shape[2] for r in rows), max(r.shape[3] for r in rows)
    # same channels and size for every row (contexts may hold more digits side by side than targets)
    rows = [
        torch.nn.functional.pad(r.expand(-1, channels, -1, -1), (0, width - r.shape[3], 0, height - r.shape[2]))
        for r in rows
    ]
    return torchvision.utils.make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=1.0)


def save_grid(rows: Sequence[Tensor], path: Path, labels: Sequence[str] = ()) -> Path:
    """One row per tensor (e.g. data, reconstructions, samples), pixels in [0, 1]."""
    if not labels:
        from geco_core.compat import import_torchvision

        torchvision = import_torchvision()

        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(_grid_image(rows), path)
        return path
    return save_grids([("", rows)], path, labels)


def save_grids(blocks: Sequence[tuple[str, Sequence[Tensor]]], path: Path, labels: Sequence[str] = ()) -> Path:
    """Figure 3 of the paper: one block per ``(title, rows)`` side by side, rows labelled on the left."""
    plt = pyplot()
    images = [_grid_image(rows) for _, rows in blocks]
    height = max(im.shape[1] for im in images)
    widths = [im.shape[2] for im in images]
    fig, axes = plt.subplots(
        1,
        len(images),
        figsize=(sum(widths) / 50 + 0.8, height / 50 + 0.5),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    for k, (ax, im, (title, rows)) in enumerate(zip(axes[0], images, blocks)):
        ax.imshow(im.permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_title(title, fontsize=9)
        if k == 0 and labels:
            step = im.shape[1] / len(rows)
            ax.set_yticks([step * (i + 0.5) for i in range(len(rows))], list(labels))
    return save_figure(fig, path, dpi=100, bbox_inches="tight")


def _numpy_of(units) -> tuple:
    """``units``' conversions applied elementwise to the numpy arrays matplotlib passes."""
    import numpy as np

    def elementwise(f):
        return np.vectorize(lambda v: f(float(v)), otypes=[float])

    return elementwise(units.convert), elementwise(units.invert)
