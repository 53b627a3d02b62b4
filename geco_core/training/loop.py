"""One training loop for every objective: :class:`Trainer`. Each step: the loss, backward, the
optimiser step unless the loss or a gradient is not finite, :meth:`GECO.follow`; every
``validate_every`` steps :meth:`Experiment.validate`; every ``log_every`` a record to the callbacks
(what the host reads back, and when: docs/training.md). Resuming restores every state, including
the RNG and the data order (a function of the step), so N steps + resume + N steps equals 2N
uninterrupted steps."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from geco_core.optim import finite_step, grad_norm, step_unless
from geco_core.training.callbacks import Callback, in_order
from geco_core.training.trainer_state import TrainerState

__all__ = ["Trainer"]


@attrs.define(kw_only=True)
class Trainer(TrainerState):
    """Runs an :class:`Experiment` in a :class:`Run` folder, calling ``callbacks`` (put in
    :func:`~geco_core.training.callbacks.in_order`) at every hook: ``Trainer(exp=..., run=...,
    callbacks=[...]).fit()``.

    The host reads the device only on the steps that log or are due a checkpoint (``synced``):
    the skipped steps are counted on the device in between (``counts``: skipped steps in a row,
    skipped steps). Once ``train.max_nonfinite_steps`` in a row are skipped, every later step is
    skipped too (the run is halted: the optimiser never steps again); the host, when it next looks,
    ends the run at the step where the limit was reached (the steps skipped beyond it are not
    counted)."""

    callbacks: Sequence[Callback] = ()
    counts: Tensor | None = None
    in_a_row: Tensor | None = None

    def __attrs_post_init__(self) -> None:
        self.callbacks = in_order(self.callbacks)

    def fit(self, start: int = 0) -> None:
        """Train from step ``start`` to ``train.steps`` (or until a callback stops the run)."""
        cfg = self.exp.config.train
        self.start = self.step = start
        self.reset_counts()
        self.exp.model.train()
        self.exp.objective.train()
        t0 = time.perf_counter()
        # the run's state up to where this fit starts is the trainer's, whichever callbacks observe it
        self.records[:0] = [r for r in self.run.read_metrics() if r["step"] <= start]
        self.last_good_checkpoint = start if self.run.has_checkpoint() else None
        try:
            self._call("on_fit_start")
            for step in range(start, cfg.steps):
                done = step + 1
                logging = done % cfg.log_every == 0 or done == cfg.steps
                metrics = self.train_step(step, logging)
                self.step = done
                if done % cfg.validate_every == 0:
                    self.exp.validate(done)
                self.synced = logging or done % cfg.checkpoint_every == 0
                record = self.read_back(metrics) if self.synced else None
                if self.status != "running":
                    break  # halted on the device: the run ends at the step it halted
                self._call("on_step_end", metrics)
                if record is not None:
                    self.records.append(record)
                    self._call("on_log", record)
                if self.status != "running":
                    break
            if self.status == "running":
                self.status = "finished"
            elif self.status == "diverged":
                last = self.last_good_checkpoint
                where = f"step {last} in {self.run.checkpoint_path}" if last is not None else "none was written"
                self.reason = f"run diverged: {self.reason}; last good checkpoint: {where}"
            self.seconds = time.perf_counter() - t0
            self._call("on_fit_end")
        finally:
            self._call("on_teardown")

    def reset_counts(self) -> None:
        """The device's counts at the start of a fit: none in a row, the run's skipped steps so far."""
        self.counts = torch.tensor([0, self.nonfinite_steps], device=self.exp.device)
        self.in_a_row = self.counts[0]  # a view: updated in place with the counts

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def train_step(self, step: int, logging: bool) -> dict[str, Tensor] | None:
        """One optimisation step on training batch ``step``, without a host sync; the metrics
        (detached, on the device) if ``logging``. The optimiser step is skipped on the device where
        the loss or a gradient is not finite, or where the run has halted."""
        exp = self.exp
        batch = exp.data.batch(exp.group.shard(exp.batches(step)), exp.device)
        loss, out = exp.loss(batch, step)
        exp.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = exp.group.all_true(finite_step(loss, grad_norm(exp.optimizer, exp.config.train.grad_clip)))
        skip = ~finite | (self.in_a_row >= exp.config.train.max_nonfinite_steps)
        self.counts.add_(skip)  # before the optimiser's step: small operations together cost least
        self.in_a_row.mul_(skip)
        step_unless(exp.optimizer, skip)
        if exp.geco is not None:
            exp.geco.follow(exp.optimizer)
        if not logging:
            return None
        metrics = exp.objective.metrics(out, batch, step)
        metrics["loss"] = loss.detach()
        return exp.group.mean(metrics)  # over the pieces of the global batch

    def read_back(self, metrics: dict[str, Tensor] | None) -> dict[str, Any] | None:
        """The host's look at the device (one sync): the counts, the divergence rule, and on a step
        that logs its record: the metrics as floats (``rmse`` from ``mse``), the count of skipped
        steps and GECO's state as flat keys (:meth:`GecoState.flat
        <geco_core.state.GecoState.flat>`), which it also keeps as ``self.geco``."""
        names = list(metrics or {})
        values = torch.cat([self.counts.double(), *(metrics[k].double().reshape(1) for k in names)]).tolist()
        limit = self.exp.config.train.max_nonfinite_steps
        beyond = max(int(values[0]) - limit, 0)  # steps skipped after the run halted: not counted
        in_a_row, nonfinite = int(values[0]) - beyond, int(values[1]) - beyond
        self.step -= beyond
        self.last_step_finite, self.nonfinite_in_a_row, self.nonfinite_steps = in_a_row == 0, in_a_row, nonfinite
        if in_a_row >= limit:
            self.stop("diverged", f"{limit} steps in a row with a non-finite loss or gradient (to step {self.step})")
            return None
        if metrics is None:
            return None
        measured = dict(zip(names, values[2:]))
        record: dict[str, Any] = {"step": self.step, "rmse": math.sqrt(measured.pop("mse")), **measured}
        record["train/nonfinite_steps"] = float(self.nonfinite_steps)
        if self.exp.geco is not None:
            self.geco = self.exp.geco.state()
            record.update(self.geco.flat())
        return record
