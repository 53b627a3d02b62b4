"""The figures of many runs: the information plane (the paper's Figure 2) and KL and RMSE against
the iteration (Figure 4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from geco_core.figures.run import pyplot, save_figure

__all__ = ["plot_curves", "plot_information_plane"]


def plot_curves(runs: Sequence[tuple[str, Sequence[dict[str, float]], float | None]], path: Path) -> Path:
    """Figure 4 of the paper: the KL (nats) and the pixel RMSE of the training batches against the
    iteration for several ``(label, records, kappa)`` runs; a GECO run's kappa is a dashed line."""
    plt = pyplot()
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
    return save_figure(fig, path, dpi=110)


def plot_information_plane(points: Sequence[dict], path: Path, title: str = "") -> Path:
    """Figure 2 of the paper: NLL (bits/dim, quantised normal at sigma_opt) against the average KL
    (nats, log scale). The final points of constrained objectives (GECO) are joined by one line per
    ``group`` (dataset and model) and ``objective``, in order of kappa and labelled with it; every
    other objective is a marker of its own in the group's colour.

    ``points``: dicts with ``group``, ``objective``, ``constrained``, ``kappa``, ``kl`` and ``nll``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
    groups = list(dict.fromkeys(p["group"] for p in points))
    others = list(dict.fromkeys(p["objective"] for p in points if not p["constrained"]))
    markers = dict(zip(others, "*sDv^<>ph"))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for g, group in enumerate(groups):
        colour = colours[g % len(colours)]
        mine = [p for p in points if p["group"] == group]
        for objective in dict.fromkeys(p["objective"] for p in mine if p["constrained"]):
            line = sorted((p for p in mine if p["objective"] == objective), key=lambda p: p["kappa"] or 0)
            ax.plot(
                [p["kl"] for p in line], [p["nll"] for p in line], "o-", color=colour, label=f"{group}: {objective}"
            )
            for p in line:
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
    return save_figure(fig, path, dpi=110)
