"""The end of a run: held-out evaluation, each constraint against its kappa, plots, summary.json.

A constraint component's status is ``met`` when its moving average ``c_ma <= 0``; ``at bound``
when it is above 0 but its reached value is within ``AT_BOUND`` (2%, relative) of kappa, on either
side, which is where GECO holds an active constraint that KL minimisation pushes against (its
moving average then hovers around 0); ``violated`` otherwise. For objectives other than GECO, the
held-out mean decides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from geco_core.constraint import component_names
from geco_core.plots import plot_trajectory, save_grid
from geco_core.training import (
    MAX_LOGGED_COMPONENTS,
    Experiment,
    evaluate_heldout,
    evaluating,
    heldout_split,
    read_metrics,
    write_atomic,
)

__all__ = ["summarise", "format_summary", "grid_rows", "AT_BOUND"]

AT_BOUND = 0.02
GRID_EXAMPLES = 8


def _status(c_ma: float | None, reached: float | None, kappa: float | None) -> str:
    if c_ma is None:
        return "-"
    if c_ma <= 0:
        return "met"
    if reached is not None and kappa and abs(reached - kappa) <= AT_BOUND * abs(kappa):
        return "at bound"
    return "violated"


def constraint_rows(exp: Experiment, heldout: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per component (one per constraint when it has more than MAX_LOGGED_COMPONENTS)."""
    geco = exp.geco
    means = heldout.get("constraint_means") if heldout else None
    rows, offset = [], 0
    for constraint in exp.constraints:
        names = component_names(constraint)
        span = slice(offset, offset + len(names))
        offset += len(names)
        kappa = getattr(constraint, "kappa", None)
        c_ma = geco.c_ma[span].cpu() if geco is not None else None
        lam = geco.lambdas[span].cpu() if geco is not None else None
        test = means[span] if means is not None else None
        reached = constraint.reached(c_ma) if c_ma is not None else None
        test_reached = constraint.reached(test) if test is not None else None
        base = {"constraint": constraint.name, "kappa": kappa, "units": getattr(constraint, "units", "")}
        if len(names) > MAX_LOGGED_COMPONENTS:
            row = {**base, "component": f"{constraint.name}[0..{len(names) - 1}]", "components": len(names)}
            if c_ma is not None:
                row.update(
                    satisfied_fraction=float((c_ma <= 0).float().mean()),
                    c_ma_max=float(c_ma.max()),
                    lambda_median=float(lam.median()),
                )
            if test is not None:
                row["heldout_satisfied_fraction"] = float((test <= 0).float().mean())
            rows.append(row)
            continue
        for j, name in enumerate(names):
            row = {**base, "component": name}
            if c_ma is not None:
                row.update(c_ma=float(c_ma[j]), **{"lambda": float(lam[j]), "beta": float(1 / lam[j])})
                if reached is not None:
                    row["reached"] = float(reached[j])
                row["status"] = _status(row["c_ma"], row.get("reached"), kappa)
            if test is not None:
                row["heldout_value"] = float(test[j])
                if test_reached is not None:
                    row["heldout_reached"] = float(test_reached[j])
                if c_ma is None:
                    row["status"] = "met" if test[j] <= 0 else "violated"
            rows.append(row)
    return rows


def grid_rows(exp: Experiment, data, n: int = GRID_EXAMPLES) -> tuple[list[torch.Tensor], list[str]]:
    """The first ``n`` examples of ``data`` (and their contexts), reconstructions and prior samples
    (given the same contexts): the rows of the paper's Figure 3, with their labels."""
    batch = data.batch(torch.arange(min(n, len(data))), exp.device)
    with evaluating(exp.model):
        recon = exp.forward(batch).x_hat
        samples = exp.model.sample(len(batch.x), batch.context)
    rows, labels = [batch.x, recon, samples], ["data", "reconstruction", "sample"]
    if batch.context is not None:
        rows, labels = [batch.context, *rows], ["context", *labels]
    return rows, labels


def summarise(exp: Experiment, run_dir: Path, trained_steps: int, seconds: float) -> dict[str, Any]:
    """Evaluate on held-out data, compare each constraint with its kappa, plot, write summary.json."""
    cfg = exp.config
    split, data = heldout_split(exp)
    heldout = evaluate_heldout(exp, data, cfg.logging.eval_examples) if cfg.logging.eval_examples else None
    rows = constraint_rows(exp, heldout)
    records = read_metrics(run_dir)
    plots: dict[str, str] = {}
    if cfg.logging.plots and records:
        kappas = {r["component"]: r["kappa"] for r in rows if "reached" in r}
        title = f"{cfg.objective.name} · {cfg.model.name} · {cfg.data.name}"
        plots["trajectory"] = str(plot_trajectory(records, kappas, run_dir / "plots" / "trajectory.png", title))
        images, labels = grid_rows(exp, data)
        plots["grid"] = str(save_grid(images, run_dir / "plots" / "grid.png", labels))
    summary = {
        "run": str(run_dir),
        "objective": cfg.objective.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "steps": cfg.train.steps,
        "trained_steps": trained_steps,
        "seconds": round(seconds, 2),
        "final": records[-1] if records else {},
        "heldout": None
        if heldout is None
        else {"split": split, "examples": heldout["examples"], "kl": heldout["kl"], "rmse": heldout["rmse"]},
        "constraints": rows,
        "plots": plots,
    }
    text = json.dumps(summary, indent=2).encode()
    write_atomic(run_dir / "summary.json", lambda f: f.write(text))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The table a user reads at the end of ``geco train``."""
    rate = summary["trained_steps"] / summary["seconds"] if summary["seconds"] else float("nan")
    lines = [
        f"run {summary['run']}: {summary['steps']} steps ({summary['trained_steps']} now, "
        f"{summary['seconds']:.0f} s, {rate:.1f} steps/s)",
        f"objective {summary['objective']} · model {summary['model']} · data {summary['data']}",
    ]
    rows = summary["constraints"]
    if rows:
        header = ("constraint", "kappa", "reached", "held-out", "status", "lambda", "beta")
        table = [header]
        for r in rows:
            table.append(
                (
                    r["component"],
                    _fmt(r.get("kappa")),
                    _fmt(r.get("reached")),
                    _fmt(r.get("heldout_reached", r.get("heldout_value"))),
                    r.get("status", f"{r.get('satisfied_fraction', float('nan')):.0%} met"),
                    _fmt(r.get("lambda", r.get("lambda_median")), ".3g"),
                    _fmt(r.get("beta"), ".3g"),
                )
            )
        widths = [max(len(t[i]) for t in table) for i in range(len(header))]
        lines.append("")
        lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
    final, held = summary["final"], summary["heldout"]
    lines.append("")
    if final:
        lines.append(f"last training batch: KL {final['kl']:.2f} nats/example, pixel RMSE {final['rmse']:.4f}")
    if held:
        lines.append(
            f"held-out ({held['split']}, {held['examples']} examples): KL {held['kl']:.2f} nats/example, "
            f"pixel RMSE {held['rmse']:.4f}"
        )
    if summary["plots"]:
        lines.append("plots: " + "\n       ".join(summary["plots"].values()))
    return "\n".join(lines)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)
