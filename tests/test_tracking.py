"""Experiment tracking in MLflow (the optional extra): against a real local store, the logged
history is the run's metrics.jsonl, and a resumed run continues the same MLflow run."""

from __future__ import annotations

import json

import pytest
from helpers import records
from test_training import config

from geco_core.training import resume, train

mlflow = pytest.importorskip("mlflow")


def history(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def test_a_run_tracked_in_mlflow_logs_its_config_metrics_summary_and_plots_and_resumes_into_the_same_run(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logging = {"progress": False, "eval_examples": 32, "mlflow": True, "dir": str(tmp_path)}
    run = train(config=config(train={"steps": 10, "checkpoint_every": 6}, logging=logging), run_dir=tmp_path / "run")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    marker = json.loads((run / "mlflow.json").read_text())
    tracked = client.get_run(marker["run_id"])
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "run"
    assert tracked.data.params["train.lr"] == "0.001" and tracked.data.params["constraints.0.kappa"] == "0.15"
    artifacts = {a.path for a in client.list_artifacts(marker["run_id"])}
    assert {"summary.json", "config.toml", "trajectory.png", "grid.png"} <= artifacts

    resume(run, steps=20)
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == marker["run_id"]
    lines = records(run)
    keys = [k for k in lines[-1] if k != "step"]
    expected = {k: sorted((r["step"], float(r[k])) for r in lines if k in r) for k in keys}
    assert history(client, marker["run_id"], keys) == expected  # every step once, as metrics.jsonl has it
    assert "test-mae/lambda" in keys and client.get_run(marker["run_id"]).info.status == "FINISHED"
