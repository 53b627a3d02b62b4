"""The training layer: configs, objectives, the run folder, the loop and its callbacks, summaries.

Imports the algorithm layer (``geco_core``), models and data, never evaluation or the CLI::

    from geco_core.training import train, resume, Callback

    class PrintKL(Callback):
        def on_log(self, trainer, record):
            print(record["step"], record["kl"])

    train("configs/quickstart.toml", extra_callbacks=[PrintKL()])
"""

from __future__ import annotations

from geco_core.training.building import build
from geco_core.training.callbacks import Callback, in_order
from geco_core.training.config import Config, load_config
from geco_core.training.experiment import Experiment, evaluate_heldout, evaluating, load_dataset
from geco_core.training.launch import RunDiverged, default_callbacks, resume, train
from geco_core.training.loop import Trainer
from geco_core.training.objectives import Objective
from geco_core.training.run import CHECKPOINT, Run, load_checkpoint, strict_json, write_atomic
from geco_core.training.supervised import accuracy, train_classifier
from geco_core.training.trainer_state import TrainerState

__all__ = [
    "Config",
    "load_config",
    "Experiment",
    "build",
    "evaluate_heldout",
    "evaluating",
    "load_dataset",
    "Callback",
    "in_order",
    "RunDiverged",
    "Trainer",
    "TrainerState",
    "default_callbacks",
    "train",
    "resume",
    "Objective",
    "CHECKPOINT",
    "Run",
    "load_checkpoint",
    "strict_json",
    "write_atomic",
    "accuracy",
    "train_classifier",
]
