"""``geco train`` and ``geco resume`` from Python: :func:`train`, :func:`resume`.

Each joins the data-parallel group torchrun describes (one process: a group of one), builds the
experiment before anything is written, holds the run folder's lock while it trains, fits with the
default callbacks (:func:`default_callbacks`) or the caller's, and
leaves the group with every process together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import attrs

from geco_core.errors import ConfigError, GecoError
from geco_core.training.building import build
from geco_core.training.callbacks import (
    Callback,
    Checkpointing,
    MetricsFile,
    Plots,
    ProgressBar,
    Summary,
    TensorBoard,
)
from geco_core.training.config import Config, load_config
from geco_core.training.distributed import DataParallelGroup, join_group, leave_group
from geco_core.training.experiment import Experiment
from geco_core.training.loop import Trainer
from geco_core.training.run import Run
from geco_core.training.tracking import MlflowTracking

__all__ = ["train", "resume", "default_callbacks", "RunDiverged"]


class RunDiverged(GecoError):
    """The run stopped because its loss, gradients or optimiser state stopped being finite; its
    summary (status ``diverged``) is written in ``run_dir``."""

    def __init__(self, reason: str, run_dir: Path) -> None:
        super().__init__(reason)
        self.run_dir = run_dir


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
    added to them. A run that diverges raises :class:`RunDiverged` after writing its summary."""
    if config is None:
        if config_path is None:
            raise ConfigError("train needs a config file or a Config")
        config = load_config(config_path, overrides)
    group = join_group(config.train.device)
    try:
        return _train(config, config_path, run_dir, group, callbacks, extra_callbacks)
    finally:
        leave_group()  # after the experiment (and its DDP wrapper) is gone with _train's frame


def _train(
    config: Config,
    config_path: str | Path | None,
    run_dir: str | Path | None,
    group: DataParallelGroup,
    callbacks: Sequence[Callback] | None,
    extra_callbacks: Sequence[Callback],
) -> Path:
    exp = build(config, group=group)  # fails on bad data or options before anything is written
    if config.logging.eval_examples or config.logging.plots:
        exp.heldout  # noqa: B018 - likewise the held-out split that the summary and plots need
    name = Path(config_path).stem if config_path else "run"
    run = Run.create(config, run_dir, name=name) if group.main else None
    run = Run(group.broadcast(run.path if run else None), config) if group.distributed else run
    with run.lock() if group.main else contextlib.nullcontext():
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
    group = join_group(run.config.train.device)
    try:
        _resume(run, steps, group, callbacks, extra_callbacks)
    finally:
        leave_group()  # after the experiment (and its DDP wrapper) is gone with _resume's frame
    return run.path


def _resume(
    run: Run,
    steps: int | None,
    group: DataParallelGroup,
    callbacks: Sequence[Callback] | None,
    extra_callbacks: Sequence[Callback],
) -> None:
    with run.lock() if group.main else contextlib.nullcontext():
        state = run.load_checkpoint() if run.has_checkpoint() else None
        done = 0 if state is None else int(state["step"])
        config = run.config
        if steps is not None:
            if steps < done:
                raise ConfigError(f"--steps {steps} is before the checkpoint's step {done}")
            config = attrs.evolve(config, train=attrs.evolve(config.train, steps=steps))
        exp = build(config, group=group)
        start = exp.load_state_dict(state) if state is not None else 0
        if steps is not None and group.main:
            run.save_config(config)
        group.barrier()
        _fit(exp, run, start, callbacks, extra_callbacks)


def default_callbacks(config: Config, group: DataParallelGroup | None = None) -> list[Callback]:
    """The callbacks ``geco train`` uses: metrics file, TensorBoard, MLflow, progress, checkpoints,
    plots, summary (as ``logging`` chooses). Processes other than the first only take part in
    checkpoints (which gather every process's RNG state); they write nothing."""
    if group is not None and not group.main:
        return [Checkpointing()]
    chosen: list[Callback] = [MetricsFile()]
    if config.logging.tensorboard:
        chosen.append(TensorBoard())
    if config.logging.mlflow:
        chosen.append(MlflowTracking())
    if config.logging.progress:
        chosen.append(ProgressBar())
    chosen.append(Checkpointing())
    if config.logging.plots:
        chosen.append(Plots())
    chosen.append(Summary())
    return chosen


def _fit(
    exp: Experiment, run: Run, start: int, callbacks: Sequence[Callback] | None, extra: Sequence[Callback]
) -> None:
    """Train in ``run`` (whose lock the caller holds) from ``start``."""
    group = exp.group
    chosen = list(default_callbacks(exp.config, group) if callbacks is None or not group.main else callbacks)
    chosen += list(extra) if group.main else []
    trainer = Trainer(exp=exp, run=run, callbacks=chosen)
    trainer.fit(start)
    # every process leaves the process group together: one that destroyed its end while process 0
    # still wrote the summary was aborted by gloo at exit (seen in CI; README, "More than one process")
    group.barrier()
    if trainer.status == "diverged":
        raise RunDiverged(trainer.reason, run.path)
