"""GECO inside PyTorch Lightning: the example trains on one device and on two (DDP, gloo), the
multipliers agree, they are logged and checkpointed, and a run resumed from a Lightning checkpoint
continues as if it had not stopped."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("geco_lightning")  # an optional integration: its tests need it installed


def run(out, *args) -> dict:
    cmd = [sys.executable, "-m", "geco_lightning.example", "--constraint", "test-mae", "--kappa", "0.2",
           "--no-sample", "--ordered", "--out", str(out), *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = lines
    return json.loads(line)


def test_one_and_two_devices_reach_the_same_multipliers_and_log_them(tmp_path):
    one = run(tmp_path / "one", "--devices", 1, "--epochs", 2)
    two = run(tmp_path / "two", "--devices", 2, "--epochs", 2)
    assert one["step"] == two["step"] == 16  # 256 examples, global batch 32, two epochs
    for key in ("test-mae/lambda", "test-mae/c_ma"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert one["test-mae/lambda"] != pytest.approx(1.0)  # it moved
    with open(tmp_path / "two" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("geco/test-mae/lambda")]
    assert len(rows) >= 15 and float(rows[-1]["geco/test-mae/lambda"]) == pytest.approx(
        two["test-mae/lambda"], rel=1e-5
    )


def test_the_multipliers_are_in_the_checkpoint_and_a_resumed_run_continues_exactly(tmp_path):
    straight = run(tmp_path / "straight", "--epochs", 2)
    run(tmp_path / "half", "--epochs", 1)
    (ckpt,) = (tmp_path / "half").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert {"geco.log_lambdas", "geco.c_ma", "geco.step"} <= set(state)
    assert state["geco._extra_state"]["components"] == ["test-mae"]
    resumed = run(tmp_path / "resumed", "--epochs", 2, "--resume", ckpt)
    for key in ("test-mae/lambda", "test-mae/c_ma", "geco/step"):
        assert resumed[key] == straight[key], key
