"""The κ finder's figure: per constraint, the way down (κ against KL) with the predictions'
intervals, the floor, the knee and the frugal κ, and the held part's learning curve with its fit
(docs/kappa.md, "How to read the plot"). It draws a :class:`~geco_core.evaluation.kappa.KappaResult`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from geco_core.figures.run import pyplot, save_figure

__all__ = ["plot_result"]


def plot_result(result: Any, path: Path) -> Path:
    """Per constraint: the way down (value against KL, coloured by lambda / natural scale, the
    predictions' intervals shaded, the floor, the knee and the frugal kappa marked) and the held
    part's learning curve with its fit."""
    plt = pyplot()
    from matplotlib.colors import LogNorm

    names = list(result.constraints)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.8 * len(names)), squeeze=False, layout="constrained")
    points = result.points
    hold = result.hold_steps
    for row, name in zip(axes, names):
        c = result.constraints[name]
        ramp = [p for p in points if p["step"] > hold]
        ax = row[0]
        drawn = ax.scatter(
            [p["values"][name] for p in ramp],
            [p["kl"] for p in ramp],
            c=[p["factor"] for p in ramp],
            cmap="viridis",
            norm=LogNorm(),
            s=14,
        )
        curve = c.curve
        ax.plot([v for v, _ in curve], [k for _, k in curve], color="grey", lw=1, label="way down (envelope)")
        rows = [r for r in c.table if r.low is not None]
        if rows:  # the interval around each prediction of the table
            ax.fill_between(
                [r.kappa for r in rows],
                [r.low for r in rows],
                [r.high for r in rows],
                color="grey",
                alpha=0.15,
                lw=0,
                label="a GECO run's KL, predicted interval",
            )
        if c.floor is not None:
            ax.axvline(c.floor, color="crimson", ls="--", lw=1, label=f"floor {c.floor:.4g} (tightest reachable)")
        marks = (("suggested_kappa", "black", "knee κ {:.4g} (tightest worth it)"), ("frugal_kappa", "tab:green",
                 "frugal κ {:.4g} (half the knee's KL)"))  # fmt: skip
        for key, colour, label in marks:
            if getattr(c, key) is not None:
                ax.axvline(getattr(c, key), color=colour, ls=":", lw=1.2, label=label.format(getattr(c, key)))
        ax.set(xlabel=f"κ: {c.units}", ylabel="KL (nats, validation)", yscale="log", title=f"{name}: κ against KL")
        ax.legend(fontsize=8)
        fig.colorbar(drawn, ax=ax, label="λ / natural scale")
        ax = row[1]
        held = [p for p in points if p["step"] <= hold]
        ax.plot([p["step"] for p in held], [p["values"][name] for p in held], "o", ms=3, label="measured (λ held high)")
        if c.fit:
            f = c.fit
            ts = torch.linspace(max(1, 0.5 * hold), result.budget, 100).tolist()
            ax.plot(ts, [f["v_inf"] + f["a"] * t ** (-f["b"]) for t in ts], color="crimson", lw=1, label="fit")
        ax.axvline(result.budget, color="grey", ls=":", lw=1, label="budget")
        ax.set(xlabel="step", ylabel=c.units, title=f"{name}: learning curve, extrapolated")
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=100)
