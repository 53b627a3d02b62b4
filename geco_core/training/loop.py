"""One training loop for every objective: :class:`Trainer`.

Each step: forward, the objective's loss, backward, then the optimiser step, unless the loss or a
gradient is not finite (that step is skipped and counted; ``train.max_nonfinite_steps`` in a row
stop the run as diverged). After the step, GECO's multipliers may have jumped (a controller
restart): :meth:`GECO.follow` then clears the optimiser's state. Every ``log_every`` steps the loop
builds one record (a dict of floats, from the objective's metrics and GECO's typed state), keeps it
in memory (``trainer.records``) and hands it to the callbacks, which write the files, the progress
bar, the checkpoints, the plots and the summary.

Resuming restores every state, including the RNG and the data order (a function of the step), so
N steps + resume + N steps equals 2N uninterrupted steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from geco_core.training.callbacks import Callback, in_order
from geco_core.training.trainer_state import TrainerState

__all__ = ["Trainer"]


@attrs.define(kw_only=True)
class Trainer(TrainerState):
    """Runs an :class:`Experiment` in a :class:`Run` folder, calling ``callbacks`` (put in
    :func:`~geco_core.training.callbacks.in_order`) at every hook: ``Trainer(exp=..., run=...,
    callbacks=[...]).fit()``."""

    callbacks: Sequence[Callback] = ()

    def __attrs_post_init__(self) -> None:
        self.callbacks = in_order(self.callbacks)

    def fit(self, start: int = 0) -> None:
        """Train from step ``start`` to ``train.steps`` (or until a callback stops the run)."""
        cfg = self.exp.config.train
        self.start = self.step = start
        self.exp.model.train()
        self.exp.objective.train()
        t0 = time.perf_counter()
        try:
            self._call("on_fit_start")
            for step in range(start, cfg.steps):
                done = step + 1
                metrics = self.train_step(step, logging=done % cfg.log_every == 0 or done == cfg.steps)
                self.step = done
                self._call("on_step_end", metrics)
                if metrics is not None:
                    record = self.record(metrics)
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

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def train_step(self, step: int, logging: bool) -> dict[str, Tensor] | None:
        """One optimisation step on training batch ``step``; the metrics (detached) if ``logging``.
        The optimiser step is skipped when the loss or a gradient is not finite."""
        exp = self.exp
        batch = exp.data.batch(exp.group.shard(exp.batches(step)), exp.device)
        loss, out = exp.loss(batch, step)
        exp.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in exp.optimizer.param_groups for p in group["params"] if p.grad is not None]
        clip = exp.config.train.grad_clip
        if clip is None:
            norm = nn.utils.get_total_norm([p.grad for p in params])
        else:
            norm = nn.utils.clip_grad_norm_(params, clip)
        finite = exp.group.all_finite(bool(torch.isfinite(loss) & torch.isfinite(norm)), exp.device)
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
        return exp.group.mean(metrics)  # over the pieces of the global batch

    def record(self, metrics: dict[str, Tensor]) -> dict[str, Any]:
        """The logged record of this step: the metrics as floats (``rmse`` from ``mse``), the count
        of skipped steps and GECO's state as flat keys (:meth:`GecoState.flat
        <geco_core.state.GecoState.flat>`), which it also keeps as ``self.geco``."""
        values = {k: float(v) for k, v in metrics.items()}
        record: dict[str, Any] = {"step": self.step, "rmse": math.sqrt(values.pop("mse")), **values}
        record["train/nonfinite_steps"] = float(self.nonfinite_steps)
        if self.exp.geco is not None:
            self.geco = self.exp.geco.state()
            record.update(self.geco.flat())
        return record
