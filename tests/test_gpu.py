"""On a GPU (skipped without one; ``benchmarks/gpu.sh`` runs them): the training step syncs the host
only when it logs, everything lives on the device, and bfloat16 trains."""

from __future__ import annotations

import json

import pytest
import torch
from test_training import config

from geco_core.training import Callback, build, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

TINY_CONV = {"name": "conv-vae", "latent_dim": 4, "channels": [8, 16], "hidden": 32}


class SyncErrors(Callback):
    """``torch.cuda.set_sync_debug_mode("error")`` from step ``first`` to ``last``: any host sync
    there raises (none of those steps logs, validates or checkpoints)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.covered = first, last, 0

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.first:
            torch.cuda.set_sync_debug_mode("error")
        elif trainer.step == self.last:
            torch.cuda.set_sync_debug_mode("default")
        elif self.first < trainer.step < self.last:
            self.covered += 1


@pytest.mark.parametrize("controller", ["paper", "restart"])
def test_a_step_that_does_not_log_never_syncs_the_host_on_the_gpu(tmp_path, controller):
    window = SyncErrors(first=5, last=35)
    cfg = config(
        model=TINY_CONV,
        objective={"name": "geco", "geco": {"alpha": 0.9, "controller": controller}},
        train={"steps": 50, "log_every": 40, "checkpoint_every": 40, "validate_every": 45, "device": "cuda"},
    )
    try:
        train(config=cfg, run_dir=tmp_path / "run", extra_callbacks=[window])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert window.covered == 29


def test_model_constraints_geco_optimiser_and_data_live_on_the_device():
    exp = build(config(model=TINY_CONV, train={"device": "cuda"}))
    tensors = [*exp.model.parameters(), *exp.model.buffers(), *exp.objective.buffers(), exp.data.images]
    for c in exp.constraints:
        tensors += [*c.parameters(), *c.buffers()]
    assert all(t.device.type == "cuda" for t in tensors)
    batch = exp.data.batch(exp.batches(0), exp.device)
    loss, _ = exp.loss(batch, 0)
    loss.backward()
    exp.optimizer.step()
    states = [v for s in exp.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert states and all(v.device.type == "cuda" for v in states)


def test_bfloat16_trains_with_a_float32_moving_average(tmp_path):
    cfg = config(model=TINY_CONV, train={"steps": 30, "device": "cuda", "precision": "bfloat16"})
    exp = build(cfg)
    assert exp.geco.c_ma.dtype == torch.float32
    run = train(config=cfg, run_dir=tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] != "diverged" and summary["heldout"]["kl"] == summary["heldout"]["kl"]
