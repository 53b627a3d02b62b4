"""Callbacks: what the training loop calls, and the ones ``geco train`` runs.

A :class:`Callback` overrides any of its hooks; every hook receives the trainer, whose state
(:class:`~geco_core.training.trainer_state.TrainerState`: the experiment, the run folder, the step,
the records, the status, GECO's typed state at the last logged step) callbacks read and may change
(``trainer.stop``). A callback that needs another's work declares it in ``after``; :func:`in_order`
puts every callback after those it names (otherwise they keep the order they were given in). The
defaults: the metrics file, TensorBoard, the progress bar, checkpoints, plots, the summary (after
the plots, whose paths it records); ``geco_core.training.launch.default_callbacks`` chooses them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from geco_core.figures import plot_trajectory, save_grid
from geco_core.state import MANY
from geco_core.training.checkpoint import nonfinite_weights
from geco_core.training.run import strict_json, write_atomic
from geco_core.training.summary import grid_rows, summarise
from geco_core.training.trainer_state import TrainerState

__all__ = [
    "Callback",
    "in_order",
    "MetricsFile",
    "TensorBoard",
    "ProgressBar",
    "JsonLines",
    "Checkpointing",
    "Plots",
    "Summary",
]


class Callback:
    """What the loop calls. Override any hook; list in ``after`` the callback classes whose hooks
    must run before this one's (:func:`in_order`)."""

    after: ClassVar[tuple[type[Callback], ...]] = ()

    def on_fit_start(self, trainer: TrainerState) -> None:
        """Before the first step (of this process: after a resume, at the checkpoint's step)."""

    def on_step_end(self, trainer: TrainerState, metrics: dict[str, Tensor] | None) -> None:
        """After each step (``trainer.step`` steps done). ``metrics`` (detached tensors) on steps
        that log, else None; ``trainer.last_step_finite`` says whether the optimiser stepped."""

    def on_log(self, trainer: TrainerState, record: dict[str, Any]) -> None:
        """Every ``train.log_every`` steps and at the last one: the record just appended to
        ``trainer.records`` (``trainer.geco`` holds the same step's typed GECO state)."""

    def on_fit_end(self, trainer: TrainerState) -> None:
        """After the last step, or when the run stopped early (``trainer.status`` says why)."""

    def on_teardown(self, trainer: TrainerState) -> None:
        """Always, last, even after an exception: release files and bars."""


def in_order(callbacks: Sequence[Callback]) -> list[Callback]:
    """``callbacks`` with each after every one it declares in ``after``, and otherwise in the
    order given; a ValueError if two wait on each other."""
    pending, placed = list(callbacks), []
    while pending:
        ready = next((c for c in pending if not any(isinstance(o, c.after) for o in pending if o is not c)), None)
        if ready is None:
            raise ValueError(f"callbacks wait on each other: {', '.join(type(c).__name__ for c in pending)}")
        placed.append(ready)
        pending.remove(ready)
    return placed


class MetricsFile(Callback):
    """``metrics.jsonl``: one strict-JSON line per record. On resume the lines logged after the
    checkpoint are dropped (the resumed run logs them again)."""

    def on_fit_start(self, trainer: TrainerState) -> None:
        run = trainer.run
        text = "".join(strict_json(r) + "\n" for r in trainer.records).encode()  # those up to the start
        write_atomic(run.metrics_path, lambda f: f.write(text))
        self.file = open(run.metrics_path, "a")  # noqa: SIM115 - closed in on_teardown

    def on_log(self, trainer: TrainerState, record: dict[str, Any]) -> None:
        self.file.write(strict_json(record) + "\n")
        self.file.flush()

    def on_teardown(self, trainer: TrainerState) -> None:
        if getattr(self, "file", None) is not None:
            self.file.close()


class TensorBoard(Callback):
    """The records as TensorBoard scalars under ``tb/`` (a resumed run purges the steps after its
    checkpoint)."""

    def on_fit_start(self, trainer: TrainerState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        start = trainer.start
        self.writer = SummaryWriter(str(trainer.run.tb_dir), purge_step=start + 1 if start else None)

    def on_log(self, trainer: TrainerState, record: dict[str, Any]) -> None:
        for k, v in record.items():
            if k != "step":
                self.writer.add_scalar(k, v, record["step"])

    def on_teardown(self, trainer: TrainerState) -> None:
        if getattr(self, "writer", None) is not None:
            self.writer.close()


class ProgressBar(Callback):
    """Progress on stderr: KL, RMSE, and per constraint component (of constraints with at most
    :data:`~geco_core.state.MANY`) its moving average and lambda, or ``unreachable``. On a terminal
    a tqdm bar; elsewhere (a CI log, ``nohup``, a cluster's job log) one plain line with the same
    fields every ``every`` (5%) of the steps or ``seconds`` (60 s), whichever comes first."""

    def __init__(self, interactive: bool | None = None, every: float = 0.05, seconds: float = 60.0) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.every, self.seconds = every, seconds

    def on_fit_start(self, trainer: TrainerState) -> None:
        self.steps = trainer.exp.config.train.steps
        self.t0 = self.last = time.perf_counter()
        self.start, self.next = trainer.start, trainer.start + max(1, round(self.every * self.steps))
        if self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps, initial=trainer.start, desc=trainer.run.path.name, dynamic_ncols=True)

    def on_step_end(self, trainer: TrainerState, metrics: dict[str, Tensor] | None) -> None:
        if self.interactive:
            self.bar.update(1)

    def on_log(self, trainer: TrainerState, record: dict[str, Any]) -> None:
        fields = self.fields(trainer, record)
        if self.interactive:
            self.bar.set_postfix(fields, refresh=False)
            return
        now, step = time.perf_counter(), trainer.step
        if step >= self.next or now - self.last >= self.seconds or step == self.steps:
            rate = (step - self.start) / max(now - self.t0, 1e-9)
            shown = ", ".join(f"{k} {v}" for k, v in fields.items())
            where = f"{trainer.run.path.name}: step {step}/{self.steps} ({step / self.steps:.0%}, {rate:.1f} steps/s)"
            print(f"{where}: {shown}", file=sys.stderr, flush=True)
            self.last, self.next = now, step + max(1, round(self.every * self.steps))

    @staticmethod
    def fields(trainer: TrainerState, record: dict[str, Any]) -> dict[str, str]:
        fields = {"KL": f"{record['kl']:.2f}", "RMSE": f"{record['rmse']:.4f}"}
        if trainer.geco is not None:
            for group in trainer.geco.by_constraint().values():
                for c in group if len(group) <= MANY else ():
                    fields[c.name] = f"{c.c_ma:+.3g}"
                    fields[f"λ_{c.name}"] = "unreachable" if c.unreachable else f"{c.lambda_:.3g}"
        elif "beta" in record:
            fields["β"] = f"{record['beta']:.3g}"
        return fields

    def on_teardown(self, trainer: TrainerState) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()


class JsonLines(Callback):
    """One strict-JSON object per logged record on stdout, for scripts (``geco train --json``)."""

    def on_log(self, trainer: TrainerState, record: dict[str, Any]) -> None:
        print(strict_json(record), flush=True)


class Checkpointing(Callback):
    """``checkpoints/latest.pt`` every ``train.checkpoint_every`` steps and at the end, atomically.
    Only after a finite step of a running fit (a due checkpoint waits for the next step the host
    reads, ``synced``, that is finite), and never from a state holding NaN or infinity (the run
    then stops as ``diverged``): a diverging run never overwrites its last good checkpoint."""

    def on_fit_start(self, trainer: TrainerState) -> None:
        self.due = False

    def on_step_end(self, trainer: TrainerState, metrics: dict[str, Tensor] | None) -> None:
        cfg = trainer.exp.config.train
        self.due = self.due or trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps
        if self.due and trainer.synced and trainer.last_step_finite and trainer.status == "running":
            state = trainer.exp.state_dict(trainer.step)  # on every process: it gathers their RNG states
            bad = nonfinite_weights(state)
            if bad:  # the same on every process: their states are in step
                trainer.stop("diverged", f"{bad[0]} holds NaN or infinity at step {trainer.step}; not written")
                return
            if trainer.exp.group.main:
                trainer.run.save_checkpoint(state)
            trainer.last_good_checkpoint = trainer.step
            self.due = False


class Plots(Callback):
    """At the end: ``plots/trajectory.png`` (the paper's Figure 1 for this run) and
    ``plots/grid.png`` (held-out data, reconstructions, samples)."""

    def on_fit_end(self, trainer: TrainerState) -> None:
        if not trainer.records:
            return
        exp, folder = trainer.exp, trainer.run.plots_dir
        title = f"{exp.config.objective.name} · {exp.config.model.name} · {exp.config.data.name}"
        components = trainer.geco.components if trainer.geco is not None else ()
        plots = trainer.artifacts.setdefault("plots", {})
        plots["trajectory"] = str(plot_trajectory(trainer.records, components, folder / "trajectory.png", title))
        images, labels = grid_rows(exp, exp.heldout[1])
        plots["grid"] = str(save_grid(images, folder / "grid.png", labels))


class Summary(Callback):
    """At the end: the held-out evaluation and ``summary.json`` (also ``trainer.summary``), with
    the paths of the plots."""

    after = (Plots,)

    def on_fit_end(self, trainer: TrainerState) -> None:
        trainer.summary = summarise(trainer)
        text = strict_json(trainer.summary, indent=2).encode()
        write_atomic(trainer.run.summary_path, lambda f: f.write(text))
