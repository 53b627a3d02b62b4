"""One training loop for every objective, with callbacks: :class:`Trainer`, :func:`train`, :func:`resume`.

Each step: forward, the objective's loss, backward, then the optimiser step, unless the loss or a
gradient is not finite (that step is skipped and counted; ``train.max_nonfinite_steps`` in a row
stop the run as diverged). After the step, GECO's multipliers may have jumped (a controller
restart): :meth:`GECO.follow` then clears the optimiser's state. Every ``log_every`` steps the loop
builds one record (a dict of floats, the only host sync of a logged step), keeps it in memory
(``trainer.records``) and hands it to the callbacks, which write the files, the progress bar, the
checkpoints, the plots and the summary.

Resuming restores every state, including the RNG and the data order (a function of the step), so
N steps + resume + N steps equals 2N uninterrupted steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from geco_core.errors import ConfigError, GecoError
from geco_core.training.config import Config, load_config
from geco_core.training.distributed import Processes, join, leave
from geco_core.training.experiment import Experiment, build
from geco_core.training.run import Run
from geco_core.training.summary import MAX_ROW_COMPONENTS, many_components

__all__ = ["Trainer", "Callback", "RunDiverged", "train", "resume", "default_callbacks"]


class RunDiverged(GecoError):
    """The run stopped because its loss, gradients or optimiser state stopped being finite; its
    summary (status ``diverged``) is written in ``run_dir``."""

    def __init__(self, reason: str, run_dir: Path) -> None:
        super().__init__(reason)
        self.run_dir = run_dir


class Callback:
    """What the loop calls, in the order the callbacks are listed. Override any of these; all
    receive the :class:`Trainer` (its experiment, run, step, records, status)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (of this process: after a resume, at the checkpoint's step)."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Tensor] | None) -> None:
        """After each step (``trainer.step`` steps done). ``metrics`` (detached tensors) on steps
        that log, else None; ``trainer.last_step_finite`` says whether the optimiser stepped."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Every ``train.log_every`` steps and at the last one: the record just appended to
        ``trainer.records``."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last step, or when the run stopped early (``trainer.status`` says why)."""

    def on_teardown(self, trainer: Trainer) -> None:
        """Always, last, even after an exception: release files and bars."""


@attrs.define
class Trainer:
    """Runs an :class:`Experiment` in a :class:`Run` folder with callbacks.

    ``status``: ``running``, then ``finished`` or ``diverged``; ``records``: every logged record of
    the run (read back from the folder on resume); ``artifacts``: what callbacks produced for
    others (plot paths); ``summary``: the final summary, once written."""

    exp: Experiment
    run: Run
    callbacks: list[Callback]
    step: int = 0
    start: int = 0
    status: str = "running"
    reason: str = ""
    records: list[dict[str, Any]] = attrs.field(factory=list)
    artifacts: dict[str, Any] = attrs.field(factory=dict)
    summary: dict[str, Any] | None = None
    seconds: float = 0.0
    last_step_finite: bool = True
    nonfinite_in_a_row: int = 0
    nonfinite_steps: int = 0
    last_good_checkpoint: int | None = None

    def stop(self, status: str, reason: str) -> None:
        """Ask the loop to stop after this step, with a status for the summary and a one-line reason."""
        self.status, self.reason = status, reason

    def fit(self, start: int = 0) -> None:
        """Train from step ``start`` to ``train.steps`` (or until a callback stops the run)."""
        cfg = self.exp.config.train
        self.start = self.step = start
        self.exp.model.train()
        self.exp.objective.train()
        t0 = time.perf_counter()
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
            for step in range(start, cfg.steps):
                done = step + 1
                logging = done % cfg.log_every == 0 or done == cfg.steps
                metrics = self.train_step(step, logging)
                self.step = done
                for cb in self.callbacks:
                    cb.on_step_end(self, metrics)
                if metrics is not None:
                    record = self.record(metrics)
                    self.records.append(record)
                    for cb in self.callbacks:
                        cb.on_log(self, record)
                if self.status != "running":
                    break
            if self.status == "running":
                self.status = "finished"
            self.seconds = time.perf_counter() - t0
            for cb in self.callbacks:
                cb.on_fit_end(self)
        finally:
            for cb in self.callbacks:
                cb.on_teardown(self)

    def train_step(self, step: int, logging: bool) -> dict[str, Tensor] | None:
        """One optimisation step on training batch ``step``; the metrics (detached) if ``logging``.
        The optimiser step is skipped when the loss or a gradient is not finite."""
        exp = self.exp
        batch = exp.data.batch(exp.processes.shard(exp.batches(step)), exp.device)
        loss, out = exp.loss(batch, step)
        exp.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in exp.optimizer.param_groups for p in group["params"] if p.grad is not None]
        clip = exp.config.train.grad_clip
        if clip is None:
            norm = nn.utils.get_total_norm([p.grad for p in params])
        else:
            norm = nn.utils.clip_grad_norm_(params, clip)
        finite = exp.processes.all_finite(bool(torch.isfinite(loss) & torch.isfinite(norm)), exp.device)
        self.last_step_finite = finite
        if finite:
            exp.optimizer.step()
            if exp.geco is not None:
                exp.geco.follow(exp.optimizer)
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_steps += 1
        if not logging:
            return None
        metrics = exp.objective.metrics(out, batch, step)
        metrics["loss"] = loss.detach()
        return exp.processes.mean(metrics)  # over the pieces of the global batch

    def record(self, metrics: dict[str, Tensor]) -> dict[str, Any]:
        """The logged record of this step: the metrics, and per constraint component the GECO
        report (``c_hat``, ``c_ma``, ``lambda``, ``beta``, ``reached``), as floats."""
        values = {k: float(v) for k, v in metrics.items()}
        record: dict[str, Any] = {"step": self.step, "rmse": math.sqrt(values.pop("mse")), **values}
        record["train/nonfinite_steps"] = float(self.nonfinite_steps)
        geco = self.exp.geco
        if geco is None:
            return record
        report = geco.report()
        for name, constraint in geco.constraints_by_name.items():
            c_ma, lam = geco.split(geco.c_ma)[name], geco.split(geco.lambdas)[name]
            if constraint.dim <= MAX_ROW_COMPONENTS:
                reached = constraint.reached(c_ma)
                names = geco.split(torch.arange(geco.num_components))[name].tolist()
                for j, index in enumerate(names):
                    component = geco.component_names[index]
                    record.update({k: v for k, v in report.items() if k.startswith(f"{component}/")})
                    if reached is not None:
                        record[f"{component}/reached"] = float(reached[j])
            else:
                stats = many_components(c_ma, geco.split(geco.satisfied())[name], lam)
                record.update({f"{name}/{k}": v for k, v in stats.items()})
        record.update({k: v for k, v in report.items() if k.startswith("geco/")})
        return record


def default_callbacks(config: Config, processes: Processes | None = None) -> list[Callback]:
    """The callbacks ``geco train`` uses: metrics file, TensorBoard, progress bar, divergence guard,
    checkpoints, plots, summary (in this order). Processes other than the first only guard and
    take part in checkpoints (which gather every process's RNG state); they write nothing."""
    from geco_core.training import callbacks as cb

    if processes is not None and not processes.main:
        return [cb.DivergenceGuard(), cb.Checkpointing()]
    chosen: list[Callback] = [cb.MetricsFile()]
    if config.logging.tensorboard:
        chosen.append(cb.TensorBoard())
    if config.logging.progress:
        chosen.append(cb.ProgressBar())
    chosen += [cb.DivergenceGuard(), cb.Checkpointing()]
    if config.logging.plots:
        chosen.append(cb.Plots())
    chosen.append(cb.Summary())
    return chosen


def _fit(
    exp: Experiment, run: Run, start: int, callbacks: Sequence[Callback] | None, extra: Sequence[Callback]
) -> Trainer:
    """Train in ``run`` (whose lock the caller holds) from ``start``."""
    main = exp.processes.main
    chosen = list(default_callbacks(exp.config, exp.processes) if callbacks is None or not main else callbacks)
    chosen += list(extra) if main else []
    trainer = Trainer(exp, run, chosen)
    trainer.fit(start)
    # every process leaves the process group together: one that destroyed its end while process 0
    # still wrote the summary was aborted by gloo at exit (seen in CI; README, "More than one process")
    exp.processes.barrier()
    if trainer.status == "diverged":
        raise RunDiverged(trainer.reason, run.path)
    return trainer


def train(
    config_path: str | Path | None = None,
    *,
    config: Config | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    callbacks: Sequence[Callback] | None = None,
    extra_callbacks: Sequence[Callback] = (),
) -> Path:
    """Start a new run from a config file (or a Config) in a new run folder; returns the folder.

    ``callbacks`` replaces the default ones (:func:`default_callbacks`); ``extra_callbacks`` are
    added after them. A run that diverges raises :class:`RunDiverged` after writing its summary."""
    if config is None:
        if config_path is None:
            raise ConfigError("train needs a config file or a Config")
        config = load_config(config_path, overrides)
    processes = join(config.train.device)
    try:
        return _train(config, config_path, run_dir, processes, callbacks, extra_callbacks)
    finally:
        leave()  # after the experiment (and its DDP wrapper) is gone


def _train(
    config: Config,
    config_path: str | Path | None,
    run_dir: str | Path | None,
    processes: Processes,
    callbacks: Sequence[Callback] | None,
    extra_callbacks: Sequence[Callback],
) -> Path:
    exp = build(config, processes=processes)  # fails on bad data or options before anything is written
    name = Path(config_path).stem if config_path else "run"
    run = Run.create(config, run_dir, name=name) if processes.main else None
    run = Run(processes.broadcast(run.path if run else None), config) if processes.distributed else run
    with run.lock() if processes.main else contextlib.nullcontext():
        _fit(exp, run, 0, callbacks, extra_callbacks)
    return run.path


def resume(
    run_dir: str | Path,
    steps: int | None = None,
    *,
    callbacks: Sequence[Callback] | None = None,
    extra_callbacks: Sequence[Callback] = (),
) -> Path:
    """Continue the run in ``run_dir`` from its checkpoint (from step 0 if it died before its first)
    to ``train.steps``, or to ``steps``."""
    run = Run.open(run_dir)
    processes = join(run.config.train.device)
    try:
        _resume(run, steps, processes, callbacks, extra_callbacks)
    finally:
        leave()  # after the experiment (and its DDP wrapper) is gone
    return run.path


def _resume(
    run: Run,
    steps: int | None,
    processes: Processes,
    callbacks: Sequence[Callback] | None,
    extra_callbacks: Sequence[Callback],
) -> None:
    with run.lock() if processes.main else contextlib.nullcontext():
        state = run.load_checkpoint() if run.has_checkpoint() else None
        done = 0 if state is None else int(state["step"])
        config = run.config
        if steps is not None:
            if steps < done:
                raise ConfigError(f"--steps {steps} is before the checkpoint's step {done}")
            config = attrs.evolve(config, train=attrs.evolve(config.train, steps=steps))
        exp = build(config, processes=processes)
        start = exp.load_state_dict(state) if state is not None else 0
        if steps is not None and processes.main:
            run.save_config(config)
        processes.barrier()
        _fit(exp, run, start, callbacks, extra_callbacks)
