"""What a fit is at any moment, as callbacks and the summary see it: :class:`TrainerState`."""

from __future__ import annotations

from typing import Any

import attrs

from geco_core.state import GecoState
from geco_core.training.experiment import Experiment
from geco_core.training.run import Run

__all__ = ["TrainerState"]


@attrs.define(kw_only=True)
class TrainerState:
    """What callbacks see of a fit. ``status``: ``running``, then ``finished`` or ``diverged``
    (``reason`` says why); ``records``: every logged record of the run (the trainer reads back
    those up to its start from the folder on resume); ``last_good_checkpoint``: the step of the
    newest checkpoint of finite state (the trainer's start where the folder holds one, then each
    that ``Checkpointing`` writes); ``geco``: GECO's typed state at the last logged step; ``artifacts``: what callbacks
    produced for others (plot paths); ``summary``: the final summary, once written. The host's
    view of the device (``last_step_finite``, the non-finite counts) is fresh on the steps where
    ``synced`` (those that log or are due a checkpoint)."""

    exp: Experiment
    run: Run
    step: int = 0
    start: int = 0
    status: str = "running"
    reason: str = ""
    records: list[dict[str, Any]] = attrs.field(factory=list)
    geco: GecoState | None = None
    artifacts: dict[str, Any] = attrs.field(factory=dict)
    summary: dict[str, Any] | None = None
    seconds: float = 0.0
    synced: bool = True
    last_step_finite: bool = True
    nonfinite_in_a_row: int = 0
    nonfinite_steps: int = 0
    last_good_checkpoint: int | None = None

    def stop(self, status: str, reason: str) -> None:
        """Ask the loop to stop after this step, with a status for the summary and a one-line reason."""
        self.status, self.reason = status, reason
