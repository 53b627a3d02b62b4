"""``geco sweep``: one or more configs over a list of kappa values and objectives, then evaluated
and plotted together (the paper's Figures 2 and 3).

Runs go to ``OUT/<config stem>/<run>`` with ``<run>`` = ``geco-k<kappa>`` (kappa of the first
constraint) or the objective's name. A sweep started again resumes: finished runs (``summary.json``)
are kept, interrupted ones continue from their checkpoint, and evaluations (``eval.json``) are
reused while the checkpoint and the evaluation options are unchanged. A run folder made with a
different config is never touched: the sweep stops and names it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from geco_core.errors import ConfigError, GecoError
from geco_core.plugins import registry
from geco_core.training import Config, Run, load_config, resume, strict_json, train, write_atomic
from geco_core.training.machine import free_cores
from geco_core.training.rows import ConstraintRow

__all__ = ["plan", "sweep", "run_name", "table", "eval_defaults"]


def run_name(objective: str, kappa: float | None) -> str:
    """``<objective>-k<kappa>`` for a constrained objective swept over kappa, else the objective."""
    return f"{objective}-k{kappa:g}" if kappa is not None else objective


def _constrained(objective: str) -> bool:
    return bool(getattr(registry().get("objective", objective).factory, "constrained", False))


def _comparable(config: Config) -> dict[str, Any]:
    """What must agree for a run folder to be reused: everything but the logging section and the
    number of threads."""
    data = config.to_dict()
    data.pop("logging", None)
    data["train"].pop("threads", None)
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


def _check_folder(run_dir: Path, config: Config) -> None:
    """A run folder already there must hold a run of the same config (logging and threads aside)."""
    if (run_dir / "config.toml").is_file() and _comparable(Run.open(run_dir).config) != _comparable(config):
        raise ConfigError(f"{run_dir} was trained with a different config; move it away or choose another --out")


def _ensure_trained(run_dir: Path, config: Config) -> str:
    """Train, resume or keep the run in ``run_dir``; returns what was done. A resumed run takes
    this sweep's machine settings (threads, progress)."""
    if (run_dir / "config.toml").is_file():
        run = Run.open(run_dir)
        if run.summary_path.is_file():
            return "kept"
        started = run.has_checkpoint()
        machine = attrs.evolve(run.config.train, threads=config.train.threads)
        run.save_config(attrs.evolve(run.config, train=machine, logging=config.logging))
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
            report["constraints"] = [ConstraintRow.from_json(row) for row in report["constraints"]]
            return report
    return evaluate_run(run_dir, **options)


def _point(group: str, stem: str, name: str, report: dict[str, Any]) -> dict[str, Any]:
    rows: list[ConstraintRow] = report["constraints"]
    return {
        "group": group,
        "config": stem,
        "run": name,
        "objective": report["objective"],
        "constrained": _constrained(report["objective"]),
        "kappa": report["kappas"][0] if report["kappas"] else None,
        "rmse": report["heldout"]["rmse"],
        "reached": rows[0].heldout if rows else None,
        "status": rows[0].status if rows else None,
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
    jobs: int | None = None,
    backend: str = "local",
    ray_address: str | None = None,
) -> list[dict[str, Any]]:
    """Train (or resume) every run of the sweep, evaluate each, and write ``OUT/sweep.json``,
    ``OUT/sweep.md``, ``OUT/information_plane.png`` and ``OUT/grids-<config>.png``.

    ``jobs`` runs at once (default: one per free core), each with its share of the cores as
    torch threads (unless ``train.threads`` says otherwise): in processes of this machine
    (``backend="local"``) or as Ray tasks (``"ray"``: the cluster at ``ray_address`` or
    ``$RAY_ADDRESS``, else a local one). A run that fails is reported with its one-line error and
    the others go on; the sweep then raises a :class:`GecoError` naming the failures."""
    from geco_core.figures import plot_information_plane, save_grids

    runs = plan(configs, kappas, objectives, overrides)
    out = Path(out)
    options = {**eval_defaults(), **(eval_options or {})}
    for stem, name, config in runs:
        _check_folder(out / stem / name, config)
    jobs = max(1, min(jobs or free_cores(), len(runs)))
    tasks = [(str(out / stem / name), _for_job(config, jobs).to_dict(), options) for stem, name, config in runs]
    reports: dict[int, dict[str, Any]] = {}
    failures = []
    with contextlib.closing(_run_all(tasks, jobs, backend, ray_address)) as results:
        for k, result in results:
            stem, name, config = runs[k]
            where = f"[{len(reports) + len(failures) + 1}/{len(runs)}] {out / stem / name}"
            if "error" in result:
                failures.append(f"{stem}/{name}: {result['error']}")
                log(f"{where}: failed: {result['error']}")
            else:
                reports[k] = result
                log(f"{where}: {result.pop('done')} and evaluated")
    points, blocks = [], {}
    for k in sorted(reports):
        stem, name, config = runs[k]
        points.append(_point(f"{config.data.name} · {config.model.name}", stem, name, reports[k]))
        blocks.setdefault(stem, []).append((name, out / stem / name))
    text = strict_json(points, indent=2).encode()
    write_atomic(out / "sweep.json", lambda f: f.write(text))
    md = table(points).encode() + b"\n"
    write_atomic(out / "sweep.md", lambda f: f.write(md))
    if points:
        plot_information_plane(points, out / "information_plane.png")
    for stem, members in blocks.items():
        grids = [(name, *_run_grid(d)) for name, d in members]
        save_grids([(name, rows) for name, rows, _ in grids], out / f"grids-{stem}.png", grids[0][2])
    if failures:
        raise GecoError(f"{len(failures)} of {len(runs)} runs of the sweep failed: " + "; ".join(failures))
    return points


def _for_job(config: Config, jobs: int) -> Config:
    """The config as a job of ``jobs`` running together: its share of the free cores as threads
    (unless ``train.threads`` is set) and, beside others, no progress bar of its own."""
    if jobs == 1:
        return config
    train_ = config.train if config.train.threads else attrs.evolve(config.train, threads=max(1, free_cores() // jobs))
    return attrs.evolve(config, train=train_, logging=attrs.evolve(config.logging, progress=False))


def run_one(run_dir: str, doc: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Train (or keep, or resume) and evaluate one run of a sweep: its evaluation report with
    ``done`` (what was done), or ``{"error": one line}``; in a worker process or a Ray task."""
    try:
        done = _ensure_trained(Path(run_dir), Config.from_dict(doc))
        return {**_evaluation(Path(run_dir), options), "done": done}
    except GecoError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any failure is this run's, not the sweep's
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def _run_all(tasks: list[tuple], jobs: int, backend: str, ray_address: str | None):
    """``(index, result)`` of every task as it completes."""
    if backend == "ray":
        yield from _run_on_ray(tasks, jobs, ray_address)
    elif backend != "local":
        raise ConfigError(f"--backend must be local or ray, got {backend!r}")
    elif jobs == 1:
        yield from ((k, run_one(*task)) for k, task in enumerate(tasks))
    else:
        import multiprocessing
        import signal

        context = multiprocessing.get_context("spawn")  # no fork of a process with torch's threads
        # Workers ignore Ctrl-C; leaving this block (the sweep interrupted, or done) terminates
        # them, and an interrupted run resumes from its last checkpoint on the next sweep.
        ignore_interrupt = (signal.SIGINT, signal.SIG_IGN)
        with context.Pool(jobs, signal.signal, ignore_interrupt, maxtasksperchild=1) as pool:
            yield from pool.imap_unordered(_run_indexed, enumerate(tasks))


def _run_indexed(item: tuple[int, tuple]) -> tuple[int, dict[str, Any]]:
    k, task = item
    return k, run_one(*task)


def _run_on_ray(tasks: list[tuple], jobs: int, address: str | None):
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'geco-core[ray]'") from None
    import torch

    started = not ray.is_initialized()
    if started:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False)
    threads = [Config.from_dict(doc).train.threads or 1 for _, doc, _ in tasks]
    gpus = 1 if torch.cuda.is_available() and address is None else 0
    try:
        remote = ray.remote(run_one)
        refs = {}
        for k, (task, n) in enumerate(zip(tasks, threads)):
            refs[remote.options(num_cpus=n, num_gpus=gpus).remote(*task)] = k
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield refs[ready[0]], ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()


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
