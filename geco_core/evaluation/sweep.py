"""``geco sweep``: one or more configs over a list of kappa values and objectives, then evaluated
and plotted together (the paper's Figures 2 and 3).

Runs go to ``OUT/<config stem>/<run>`` with ``<run>`` = ``geco-k<kappa>`` (kappa of the first
constraint) or the objective's name. A sweep started again resumes: finished runs (``summary.json``)
are kept, interrupted ones continue from their checkpoint, and evaluations (``eval.json``) are
reused while the checkpoint and the evaluation options are unchanged. A run folder made with a
different config is never touched: the sweep stops and names it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geco_core.errors import ConfigError
from geco_core.plugins import registry
from geco_core.training import Config, Run, load_config, resume, strict_json, train, write_atomic

__all__ = ["plan", "sweep", "run_name", "table", "eval_defaults"]


def run_name(objective: str, kappa: float | None) -> str:
    """``<objective>-k<kappa>`` for a constrained objective swept over kappa, else the objective."""
    return f"{objective}-k{kappa:g}" if kappa is not None else objective


def _constrained(objective: str) -> bool:
    return bool(getattr(registry().get("objective", objective).factory, "constrained", False))


def _comparable(config: Config) -> dict[str, Any]:
    """What must agree for a run folder to be reused: everything but the logging section."""
    data = config.to_dict()
    data.pop("logging", None)
    return data


def plan(
    configs: Sequence[str | Path],
    kappas: Sequence[float] = (),
    objectives: Sequence[str] = ("geco",),
    overrides: Sequence[str] = (),
) -> list[tuple[str, str, Config]]:
    """``(config stem, run name, resolved config)`` for every run of the sweep, in order."""
    if not configs:
        raise ConfigError("sweep needs at least one config")
    installed = registry().names("objective")
    for objective in objectives:
        if objective not in installed:
            raise ConfigError(f"--objectives: unknown objective {objective!r}; choose from {', '.join(installed)}")
    for kappa in kappas:
        if not kappa > 0:
            raise ConfigError(f"--kappa: kappa must be > 0, got {kappa!r}")
    if kappas and not any(_constrained(o) for o in objectives):
        raise ConfigError("--kappa is given but no objective among --objectives enforces constraints")
    runs = []
    for path in configs:
        stem = Path(path).stem
        for objective in dict.fromkeys(objectives):
            sets = [*overrides, f"objective.name={objective!r}"]
            if _constrained(objective) and kappas:
                for kappa in kappas:
                    config = load_config(path, [*sets, f"constraints.0.kappa={kappa!r}"])
                    runs.append((stem, run_name(objective, kappa), config))
            else:
                runs.append((stem, objective, load_config(path, sets)))
    return runs


def _ensure_trained(run_dir: Path, config: Config) -> str:
    """Train, resume or keep the run in ``run_dir``; returns what was done."""
    if (run_dir / "config.toml").is_file():
        run = Run.open(run_dir)
        if _comparable(run.config) != _comparable(config):
            raise ConfigError(f"{run_dir} was trained with a different config; move it away or choose another --out")
        if run.summary_path.is_file():
            return "kept"
        started = run.has_checkpoint()
        resume(run_dir)  # from its checkpoint, or from step 0 if it died before the first
        return "resumed" if started else "trained"
    train(config=config, run_dir=run_dir)
    return "trained"


def eval_defaults() -> dict[str, Any]:
    """The options of :func:`~geco_core.evaluation.evaluate_run` and their defaults."""
    import inspect

    from geco_core.evaluation.measures import evaluate_run

    params = inspect.signature(evaluate_run).parameters.values()
    return {p.name: p.default for p in params if p.name not in ("run_dir", "write")}


def _evaluation(run_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    from geco_core.evaluation.measures import evaluate_run

    run = Run.open(run_dir)
    if run.eval_path.is_file():
        report = json.loads(run.eval_path.read_text())
        if report.get("options") == options and report.get("step") == run.checkpoint_step():
            return report
    return evaluate_run(run_dir, **options)


def _point(group: str, stem: str, name: str, report: dict[str, Any]) -> dict[str, Any]:
    first = report["constraints"][0] if report["constraints"] else {}
    return {
        "group": group,
        "config": stem,
        "run": name,
        "objective": report["objective"],
        "constrained": _constrained(report["objective"]),
        "kappa": report["kappas"][0] if report["kappas"] else None,
        "rmse": report["heldout"]["rmse"],
        "reached": first.get("heldout_reached", first.get("heldout_value")),
        "status": first.get("status"),
        "kl": report["average_kl"]["nats"],
        "marginal_kl": report["marginal_kl"]["nats"],
        "marginal_kl_stderr": report["marginal_kl"].get("stderr"),
        "sigma_opt": report["sigma_opt"]["value"],
        "nll": report["nll"]["bits_per_dim"],
        "step": report["step"],
    }


def table(points: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the sweep's final points."""
    head = "| config | run | held-out RMSE | κ | status | avg KL (nats) | marginal KL (nats) | σ_opt | NLL (bits/dim) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for p in points:
        mk = "-" if p["marginal_kl"] is None else f"{p['marginal_kl']:.1f} ± {p['marginal_kl_stderr']:.1f}"
        kappa = "-" if p["kappa"] is None else f"{p['kappa']:g}"
        lines.append(
            f"| {p['config']} | {p['run']} | {p['rmse']:.4f} | {kappa} | {p['status'] or '-'} | {p['kl']:.1f} | "
            f"{mk} | {p['sigma_opt']:.4f} | {p['nll']:.3f} |"
        )
    return "\n".join(lines)


def sweep(
    configs: Sequence[str | Path],
    out: str | Path,
    kappas: Sequence[float] = (),
    objectives: Sequence[str] = ("geco",),
    overrides: Sequence[str] = (),
    eval_options: dict[str, Any] | None = None,
    log=print,
) -> list[dict[str, Any]]:
    """Train (or resume) every run of the sweep, evaluate each, and write ``OUT/sweep.json``,
    ``OUT/sweep.md``, ``OUT/information_plane.png`` and ``OUT/grids-<config>.png``."""
    from geco_core.figures import plot_information_plane, save_grids

    runs = plan(configs, kappas, objectives, overrides)
    out = Path(out)
    options = {**eval_defaults(), **(eval_options or {})}
    points, blocks = [], {}
    for k, (stem, name, config) in enumerate(runs, 1):
        run_dir = out / stem / name
        log(f"[{k}/{len(runs)}] {run_dir}: training")
        done = _ensure_trained(run_dir, config)
        log(f"[{k}/{len(runs)}] {run_dir}: {done}; evaluating")
        report = _evaluation(run_dir, options)
        group = f"{config.data.name} · {config.model.name}"
        points.append(_point(group, stem, name, report))
        blocks.setdefault(stem, []).append((name, run_dir))
    text = strict_json(points, indent=2).encode()
    write_atomic(out / "sweep.json", lambda f: f.write(text))
    md = table(points).encode() + b"\n"
    write_atomic(out / "sweep.md", lambda f: f.write(md))
    plot_information_plane(points, out / "information_plane.png")
    for stem, members in blocks.items():
        grids = [(name, *_run_grid(d)) for name, d in members]
        save_grids([(name, rows) for name, rows, _ in grids], out / f"grids-{stem}.png", grids[0][2])
    return points


def _run_grid(run_dir: Path) -> tuple[list, list[str]]:
    """Figure 3's rows (data, reconstructions, samples) of the run's checkpoint, on held-out data."""
    import torch

    from geco_core.training import build
    from geco_core.training.summary import grid_rows

    run = Run.open(run_dir)
    with torch.random.fork_rng(devices=[]):
        exp = build(run.config)
        exp.load_state_dict(run.load_checkpoint())
        torch.manual_seed(0)
        return grid_rows(exp, exp.heldout[1], n=6)
