"""The run in MLflow too (``[logging] mlflow = true``, the extra ``geco-core[mlflow]``; what it logs:
docs/training.md): :class:`MlflowTracking`. The MLflow run's id is kept in the run folder
(``mlflow.json``), so a resume continues that run, logging only the steps MLflow does not have."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from geco_core.errors import ConfigError
from geco_core.training.callbacks import Callback, Plots, Summary
from geco_core.training.run import write_atomic
from geco_core.training.trainer_state import TrainerState

__all__ = ["MlflowTracking", "flatten"]

EXPERIMENT = "geco"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": 0.001}``; lists by index."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _key(name: str) -> str:
    """A metric or parameter name MLflow accepts."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


class MlflowTracking(Callback):
    """The run in MLflow (module docstring). Logs its artifacts after the plots and the summary."""

    after = (Plots, Summary)

    def __init__(self) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("logging.mlflow = true needs MLflow: pip install 'geco-core[mlflow]'") from None

    def on_fit_start(self, trainer: TrainerState) -> None:
        from mlflow.tracking import MlflowClient

        folder = trainer.run.path
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{folder.parent.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            artifacts = (folder.parent.resolve() / "mlflow-artifacts").as_uri() if uri.startswith("sqlite") else None
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        marker = folder / "mlflow.json"
        known = json.loads(marker.read_text()) if marker.is_file() else {}
        if known.get("tracking_uri") == uri:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=folder.name).info.run_id
            text = json.dumps({"tracking_uri": uri, "run_id": self.run_id}).encode()
            write_atomic(marker, lambda f: f.write(text))
            for key, value in flatten(trainer.exp.config.to_dict()).items():
                self.client.log_param(self.run_id, _key(key), value)
        history = self.client.get_metric_history(self.run_id, "kl")
        self.logged_to = max((m.step for m in history), default=-1)

    def on_log(self, trainer: TrainerState, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(record["step"])
        if step <= self.logged_to:
            return  # a resumed run repeats these steps exactly: MLflow has them already
        now = int(time.time() * 1000)
        metrics = [
            Metric(_key(k), float(v), now, step)
            for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and v == v and abs(v) != float("inf")
        ]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.logged_to = step

    def on_fit_end(self, trainer: TrainerState) -> None:
        run = trainer.run
        for path in [run.summary_path, run.path / "config.toml", *sorted(Path(run.plots_dir).glob("*.png"))]:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED" if trainer.status == "finished" else "FAILED")
        self.run_id = None

    def on_teardown(self, trainer: TrainerState) -> None:
        if getattr(self, "run_id", None) is not None:  # stopped by an exception
            self.client.set_terminated(self.run_id, "KILLED")
