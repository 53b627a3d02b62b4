"""Plots: a run's training trajectory (the paper's Figure 1), the information plane of many runs
(Figure 2) and image grids of one or several runs side by side (Figure 3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["plot_trajectory", "plot_curves", "plot_information_plane", "save_grid", "save_grids", "as_displayable"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, **savefig) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and release it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **savefig)
    _pyplot().close(fig)
    return path


def plot_trajectory(
    records: Sequence[dict[str, float]], kappas: dict[str, float | None], path: Path, title: str = ""
) -> Path:
    """Figure 1 of the paper for one run, iteration encoded by colour in every panel:
    the information plane (KL vs pixel RMSE), each constraint's reached value against its kappa
    line, the equivalent beta (= 1/lambda for GECO), and the KL over training.

    ``kappas`` maps a component name to its kappa, for components whose ``name/reached`` was logged.
    """
    plt = _pyplot()
    steps = [r["step"] for r in records]
    shown = [n for n in kappas if records and f"{n}/reached" in records[-1]]
    betas = [k for k in (records[-1] if records else {}) if k.endswith("/beta")] or ["beta"]
    panels = 3 + len(shown)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), squeeze=False, layout="constrained")
    axes = list(axes[0])
    style = dict(c=steps, cmap="viridis", s=8)

    def series(key: str) -> list[float]:
        return [r.get(key, float("nan")) for r in records]

    ax = axes.pop(0)
    points = ax.scatter(series("kl"), series("rmse"), **style)
    ax.set(xlabel="KL (nats)", ylabel="pixel RMSE", title="information plane", yscale="log")
    for name in shown:
        ax = axes.pop(0)
        ax.scatter(steps, series(f"{name}/reached"), **style)
        if kappas[name] is not None:
            ax.axhline(kappas[name], color="crimson", ls="--", lw=1, label=f"κ = {kappas[name]:g}")
            ax.legend(loc="best")
        ax.set(xlabel="iteration", ylabel="reached (moving average)", title=f"constraint {name}")
    ax = axes.pop(0)
    for key in betas:
        ax.scatter(steps, series(key), **style)
    label = "β = 1/λ" if betas != ["beta"] else "β"
    ax.set(xlabel="iteration", ylabel=label, title=f"equivalent {label}", yscale="log")
    ax = axes.pop(0)
    ax.scatter(steps, series("kl"), **style)
    ax.set(xlabel="iteration", ylabel="KL (nats)", title="KL")
    fig.colorbar(points, ax=fig.axes, label="iteration", shrink=0.9)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi=110)


def plot_curves(runs: Sequence[tuple[str, Sequence[dict[str, float]], float | None]], path: Path) -> Path:
    """Figure 4 of the paper: the KL (nats) and the pixel RMSE of the training batches against the
    iteration for several ``(label, records, kappa)`` runs; a GECO run's kappa is a dashed line."""
    plt = _pyplot()
    fig, (ax_kl, ax_rmse) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for label, records, kappa in runs:
        steps = [r["step"] for r in records]
        (line,) = ax_kl.plot(steps, [r["kl"] for r in records], label=label, lw=1)
        ax_rmse.plot(steps, [r["rmse"] for r in records], color=line.get_color(), lw=1)
        if kappa is not None:
            ax_rmse.axhline(kappa, color=line.get_color(), ls="--", lw=1)
    ax_kl.set(xlabel="iteration", ylabel="average KL of the batch (nats)", yscale="log", title="KL")
    ax_rmse.set(xlabel="iteration", ylabel="pixel RMSE of the batch", yscale="log", title="reconstruction error")
    ax_kl.legend(fontsize=8)
    return _save(fig, path, dpi=110)


def as_displayable(images: Tensor) -> Tensor:
    """Images with 1 or 3 channels as they are; other channel counts side by side in grey."""
    b, c, h, w = images.shape
    if c in (1, 3):
        return images
    return images.permute(0, 2, 1, 3).reshape(b, 1, h, c * w)


def _grid_image(rows: Sequence[Tensor]) -> Tensor:
    """One grid image ``(3, H, W)`` with a row per tensor, pixels in [0, 1]."""
    from geco_core.compat import torchvision

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
        from geco_core.compat import torchvision

        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(_grid_image(rows), path)
        return path
    return save_grids([("", rows)], path, labels)


def save_grids(blocks: Sequence[tuple[str, Sequence[Tensor]]], path: Path, labels: Sequence[str] = ()) -> Path:
    """Figure 3 of the paper: one block per ``(title, rows)`` side by side, rows labelled on the left."""
    plt = _pyplot()
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
    return _save(fig, path, dpi=100, bbox_inches="tight")


def plot_information_plane(points: Sequence[dict], path: Path, title: str = "") -> Path:
    """Figure 2 of the paper: NLL (bits/dim, quantised normal at sigma_opt) against the average KL
    (nats, log scale). GECO's final points are joined by one line per ``group`` (dataset and model),
    in order of kappa and labelled with it; other objectives are separate markers in the group's colour.

    ``points``: dicts with ``group``, ``objective``, ``kappa`` (GECO), ``kl`` and ``nll``."""
    plt = _pyplot()
    markers = {"elbo": "*", "annealed-beta": "s", "beta": "D"}
    fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
    groups = list(dict.fromkeys(p["group"] for p in points))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for g, group in enumerate(groups):
        colour = colours[g % len(colours)]
        mine = [p for p in points if p["group"] == group]
        geco = sorted((p for p in mine if p["objective"] == "geco"), key=lambda p: p["kappa"] or 0)
        if geco:
            ax.plot([p["kl"] for p in geco], [p["nll"] for p in geco], "o-", color=colour, label=f"{group}: GECO")
            for p in geco:
                ax.annotate(
                    f"κ={p['kappa']:g}", (p["kl"], p["nll"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        for objective, marker in markers.items():
            pts = [p for p in mine if p["objective"] == objective]
            if pts:
                ax.scatter(
                    [p["kl"] for p in pts],
                    [p["nll"] for p in pts],
                    marker=marker,
                    s=70,
                    color=colour,
                    edgecolors="black",
                    label=f"{group}: {objective}",
                    zorder=3,
                )
    ax.set(xscale="log", xlabel="average KL (nats)", ylabel="NLL (bits/dim, quantised normal at σ_opt)")
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi=110)
