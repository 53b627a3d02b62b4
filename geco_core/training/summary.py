"""The end of a run: held-out evaluation and each constraint against its kappa (``summary.json``).

A constraint component's status is:

* ``met`` when its moving average ``c_ma <= 0``;
* ``at bound`` when it is above 0 but its reached value is within ``AT_BOUND`` (2%, relative) of
  kappa, on either side, which is where GECO holds an active constraint that KL minimisation pushes
  against (its moving average then hovers around 0);
* ``unreachable`` when the controller stopped lambda from growing because the constraint stalled
  above kappa (the row says the best value reached and the step it was reached at);
* ``violated`` otherwise.

For objectives other than GECO the held-out mean decides (``met`` or ``violated``). The summary's
``status`` is the run's: ``finished`` or ``diverged``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from geco_core.training.experiment import Experiment, evaluate_heldout, evaluating

if TYPE_CHECKING:
    from geco_core.training.loop import Trainer

__all__ = [
    "summarise",
    "constraint_rows",
    "status",
    "kappas",
    "many_components",
    "grid_rows",
    "format_summary",
    "AT_BOUND",
]

AT_BOUND = 0.02
GRID_EXAMPLES = 8
MAX_ROW_COMPONENTS = 8  # a constraint with more components gets one row (and log entry) of statistics


def status(c_ma: float, reached: float | None, kappa: float | None, unreachable: bool = False) -> str:
    """A component's status from its moving average, the value it reached and its kappa."""
    if c_ma <= 0:
        return "met"
    if reached is not None and kappa and abs(reached - kappa) <= AT_BOUND * abs(kappa):
        return "at bound"
    return "unreachable" if unreachable else "violated"


def many_components(c_ma: Tensor, satisfied: Tensor, lambdas: Tensor) -> dict[str, float]:
    """A constraint with many components in three numbers: the share satisfied, the worst moving
    average, the median multiplier."""
    return {
        "satisfied_fraction": float(satisfied.float().mean()),
        "c_ma_max": float(c_ma.max()),
        "lambda_median": float(lambdas.median()),
    }


def kappas(exp: Experiment) -> dict[str, float]:
    """Component name -> its constraint's kappa."""
    if exp.stack is None:
        return {}
    dims = [c.dim for c in exp.stack.constraints]
    per_component = [c.kappa for c, d in zip(exp.stack.constraints, dims) for _ in range(d)]
    return dict(zip(exp.stack.component_names, per_component))


def constraint_rows(exp: Experiment, heldout: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per component (one per constraint when it has more than MAX_ROW_COMPONENTS)."""
    stack, geco = exp.stack, exp.geco
    if stack is None:
        return []
    means = heldout.get("constraint_means") if heldout else None
    index = stack.split(torch.arange(stack.num_components))
    per = {
        "c_ma": stack.split(geco.c_ma.cpu()) if geco is not None else None,
        "satisfied": stack.split(geco.satisfied().cpu()) if geco is not None else None,
        "lambda": stack.split(geco.lambdas.cpu()) if geco is not None else None,
        "heldout": stack.split(means) if means is not None else None,
    }
    unreachable = geco.controller.unreachable(geco) if geco is not None else None
    unreachable = stack.split(unreachable.cpu()) if unreachable is not None else None
    report = geco.report() if geco is not None else {}
    rows = []
    for name, constraint in stack.by_name.items():
        c_ma = per["c_ma"][name] if per["c_ma"] is not None else None
        lam = per["lambda"][name] if per["lambda"] is not None else None
        test = per["heldout"][name] if per["heldout"] is not None else None
        base = {"constraint": name, "kappa": constraint.kappa, "units": constraint.units}
        if constraint.dim > MAX_ROW_COMPONENTS:
            row = {**base, "component": f"{name}[0..{constraint.dim - 1}]", "components": constraint.dim}
            if c_ma is not None:
                row.update(many_components(c_ma, per["satisfied"][name], lam))
            if test is not None:
                row["heldout_satisfied_fraction"] = float((test <= 0).float().mean())
            rows.append(row)
            continue
        reached = constraint.reached(c_ma) if c_ma is not None else None
        test_reached = constraint.reached(test) if test is not None else None
        for j, i in enumerate(index[name].tolist()):
            component = stack.component_names[i]
            row = {**base, "component": component}
            if c_ma is not None:
                row.update(c_ma=float(c_ma[j]), **{"lambda": float(lam[j]), "beta": float(1 / lam[j])})
                if reached is not None:
                    row["reached"] = float(reached[j])
                stalled = bool(unreachable[name][j]) if unreachable is not None else False
                row["status"] = status(row["c_ma"], row.get("reached"), constraint.kappa, stalled)
                if row["status"] == "unreachable":
                    best = report[f"{component}/best_c_ma"]
                    best_reached = constraint.reached(torch.tensor([best] * constraint.dim))
                    row["best"] = float(best_reached[j]) if best_reached is not None else best
                    row["best_step"] = int(report[f"{component}/best_step"])
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


def summarise(trainer: Trainer) -> dict[str, Any]:
    """The summary of a finished (or stopped) run: held-out evaluation, constraint rows, the last
    record, plots, status."""
    exp, cfg = trainer.exp, trainer.exp.config
    split, data = exp.heldout
    heldout = evaluate_heldout(exp, data, cfg.logging.eval_examples) if cfg.logging.eval_examples else None
    records = trainer.records
    return {
        "run": str(trainer.run.path),
        "status": trainer.status,
        "reason": trainer.reason or None,
        "objective": cfg.objective.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "steps": cfg.train.steps,
        "step": trainer.step,
        "trained_steps": trainer.step - trainer.start,
        "nonfinite_steps": trainer.nonfinite_steps,
        "seconds": round(trainer.seconds, 2),
        "final": records[-1] if records else {},
        "heldout": None
        if heldout is None
        else {"split": split, "examples": heldout["examples"], "kl": heldout["kl"], "rmse": heldout["rmse"]},
        "constraints": constraint_rows(exp, heldout),
        "plots": dict(trainer.artifacts.get("plots", {})),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The table a user reads at the end of ``geco train``."""
    rate = summary["trained_steps"] / summary["seconds"] if summary["seconds"] else float("nan")
    lines = [
        f"run {summary['run']}: {summary['steps']} steps ({summary['trained_steps']} now, "
        f"{summary['seconds']:.0f} s, {rate:.1f} steps/s)",
        f"objective {summary['objective']} · model {summary['model']} · data {summary['data']}",
    ]
    if summary.get("status") == "diverged":
        lines.append(f"DIVERGED: {summary['reason']}")
    rows = summary["constraints"]
    if rows:
        header = ("constraint", "kappa", "reached", "held-out", "status", "lambda", "beta")
        table = [header]
        for r in rows:
            state = r.get("status", f"{r.get('satisfied_fraction', float('nan')):.0%} met")
            if state == "unreachable":
                state = f"unreachable (best {r['best']:.4g} at step {r['best_step']})"
            table.append(
                (
                    r["component"],
                    _fmt(r.get("kappa")),
                    _fmt(r.get("reached")),
                    _fmt(r.get("heldout_reached", r.get("heldout_value"))),
                    state,
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
        lines.append(
            f"last training batch: KL {_fmt(final.get('kl'), '.2f')} nats/example, pixel RMSE {_fmt(final.get('rmse'))}"
        )
    if held:
        lines.append(
            f"held-out ({held['split']}, {held['examples']} examples): KL {_fmt(held['kl'], '.2f')} nats/example, "
            f"pixel RMSE {_fmt(held['rmse'])}"
        )
    if summary["plots"]:
        lines.append("plots: " + "\n       ".join(summary["plots"].values()))
    return "\n".join(lines)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    """A number for the table; ``-`` for one that is missing or was not finite (null in JSON)."""
    return "-" if value is None else format(value, spec)
