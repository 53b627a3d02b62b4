"""The end of a run: held-out evaluation and each constraint against its kappa (``summary.json``).

One row per constraint component, from GECO's typed state (:class:`~geco_core.state.ComponentState`:
kappa, ``c_ma``, lambda, beta, the value reached, its status — ``met``, ``at bound``,
``unreachable`` with the best value and its step, ``violated``) and the held-out mean of the
component; a constraint of more than :data:`~geco_core.state.MANY` components gets one row of
:func:`~geco_core.state.overview`. For objectives other than GECO the held-out mean decides
(``met`` or ``violated``). The summary's ``status`` is the run's: ``finished`` or ``diverged``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from geco_core.constraint import perfect, tighter
from geco_core.state import MANY, overview
from geco_core.training.experiment import Experiment, evaluate_heldout, evaluating
from geco_core.training.rng import seeded
from geco_core.training.rows import CONVERTED, ConstraintRow, Judged, SecondUnit
from geco_core.training.trainer_state import TrainerState

__all__ = ["summarise", "constraint_rows", "advice", "grid_rows", "format_summary"]

GRID_EXAMPLES = 8


def constraint_rows(exp: Experiment, heldout: dict[str, Any] | None) -> list[ConstraintRow]:
    """One row per component (one per constraint of more than :data:`MANY` components)."""
    stack = exp.stack
    if stack is None:
        return []
    means = heldout.get("constraint_means") if heldout else None
    test_reached = stack.reached(means).tolist() if means is not None else None
    judge_means = heldout.get("judge_means") if heldout else None
    data_means = heldout.get("data_means") if heldout else None
    data_reached = stack.reached(data_means).tolist() if data_means is not None else None
    states = exp.geco.state().by_constraint() if exp.geco is not None else {}
    index = stack.split(torch.arange(stack.num_components))
    rows = []
    for k, (name, constraint) in enumerate(stack.by_name.items()):
        judged = _judged(constraint, judge_means[k]) if judge_means else {}
        base = {"constraint": name, "kappa": constraint.kappa, "units": constraint.units}
        components, group = index[name].tolist(), states.get(name, ())
        if constraint.dim > MANY:
            row = {**base, "component": f"{name}[0..{constraint.dim - 1}]", "components": constraint.dim}
            row.update(overview(group) if group else {})
            if means is not None:
                row["heldout_satisfied_fraction"] = float((means[components] <= 0).float().mean())
            rows.append(ConstraintRow(**row))
            continue
        for j, i in enumerate(components):
            row = {**base, "component": stack.component_names[i]}
            if group:
                state = group[j]
                row.update(c_ma=state.c_ma, lambda_=state.lambda_, beta=state.beta, reached=state.reached)
                row["status"] = state.status
                if state.status == "unreachable":
                    row.update(best=state.best, best_step=state.best_step)
            if means is not None:
                row["heldout_value"] = float(means[i])
                if not math.isnan(test_reached[i]):
                    row["heldout_reached"] = test_reached[i]
                if not group:
                    row["status"] = "met" if means[i] <= 0 else "violated"
            row["judges"] = tuple(values[j] for values in judged.values())
            if data_reached is not None and not math.isnan(data_reached[i]):
                reference, side = perfect(constraint), tighter(constraint)
                if abs(data_reached[i] - reference) > 1e-3 * abs(constraint.kappa - reference):  # float32 aside
                    row["data_reached"] = data_reached[i]
                    row["beyond_data"] = side * (constraint.kappa - data_reached[i]) > 0
            also = getattr(constraint, "also", None)
            if also is not None:
                values = {key: also.convert(row[key]) for key in CONVERTED if row.get(key) is not None}
                row["also"] = SecondUnit(also.name, also.symbol, values)
            rows.append(ConstraintRow(**row))
    return rows


def _judged(constraint, means: dict[str, torch.Tensor]) -> dict[str, list[Judged]]:
    """Per judge, per component: the held-out mean value, the value in kappa's units, and
    ``met`` or ``violated``."""
    out = {}
    for judge, mean in means.items():
        reached = constraint.reached(mean)
        out[judge] = [
            Judged(
                judge,
                float(v),
                None if reached is None or math.isnan(reached[j]) else float(reached[j]),
                "met" if v <= 0 else "violated",
            )
            for j, v in enumerate(mean.tolist())
        ]
    return out


def advice(rows: list[ConstraintRow], config_name: str) -> list[str]:
    """What a user can do about each unreachable component, and each met under its own network
    but not under every independent judge: one line each."""
    lines = []
    remedies = (
        f"Choose a reachable kappa with `geco find-kappa {config_name}`, give it more train.steps, or let "
        "lambda grow further (controller max_factor)."
    )
    for r in rows:
        if r.beyond_data:
            lines.append(
                f"{r.component}: kappa {r.kappa:g} is tighter than the held-out data themselves reach "
                f"({r.data_reached:.4g}): only reconstructions that beat the data meet it (for a learned constraint, "
                "exaggerated ones); choose a kappa the data reach, or another network."
            )
        if r.status == "unreachable":
            lines.append(
                f"{r.component}: kappa {r.kappa:g} is out of reach at this budget; the best it reached was "
                f"{r.best:.4g} at step {r.best_step}. {remedies}"
            )
        elif r.status == "violated" and r.lambda_ is not None and r.reached is not None:
            lines.append(
                f"{r.component}: kappa {r.kappa:g} was not met in this run (reached {r.reached:.4g}), perhaps "
                f"out of reach at this budget. {remedies}"
            )
        met_here = r.heldout_value is not None and r.heldout_value <= 0
        if met_here and r.judges_met < len(r.judges):
            failed = ", ".join(f"{j.name} {j.shown:.4g}" for j in r.judges if j.status != "met")
            lines.append(
                f"{r.component}: met under its own network, not under every independent judge ({failed} vs kappa "
                f"{r.kappa:g}): the reconstructions may fool the network rather than satisfy the constraint; "
                "look at them (plots/grid.png), and stack it with a pixel constraint (re) where it is alone."
            )
    return lines


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


def summarise(trainer: TrainerState) -> dict[str, Any]:
    """The summary of a finished (or stopped) run: held-out evaluation (one posterior draw per
    example, from a seed of its own), constraint rows, the last record, plots, status."""
    exp, cfg = trainer.exp, trainer.exp.config
    split, data = exp.heldout if cfg.logging.eval_examples else (None, None)
    heldout = None
    if data is not None:  # posterior draws of their own: the same whichever callbacks drew before
        with seeded(exp.device, cfg.train.seed * 1_000_003 - 1):
            heldout = evaluate_heldout(exp, data, cfg.logging.eval_examples)
    records = trainer.records
    rows = constraint_rows(exp, heldout)
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
        "constraints": rows,
        "advice": advice(rows, str(trainer.run.path / "config.toml")),
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
            state = r.status or f"{math.nan if r.satisfied_fraction is None else r.satisfied_fraction:.0%} met"
            if state == "unreachable":
                state = f"unreachable (best {r.best:.4g} at step {r.best_step})"
            table.append(
                (
                    r.component,
                    _fmt(r.kappa) + r.second("kappa"),
                    _fmt(r.reached) + r.second("reached"),
                    _fmt(r.heldout) + r.second("heldout_reached"),
                    state,
                    _fmt(r.lambda_ if r.lambda_ is not None else r.lambda_median, ".3g"),
                    _fmt(r.beta, ".3g"),
                )
            )
        widths = [max(len(t[i]) for t in table) for i in range(len(header))]
        lines.append("")
        lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
        lines += [line for r in rows for line in (r.data_line(), r.judges_line()) if line]
        lines += summary.get("advice") or []
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
