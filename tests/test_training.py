"""The trainer: real short runs. What a run folder holds, exact resume, atomic checkpoints, a corrupt
checkpoint refused without harm, and GECO doing its job on real MNIST."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tomllib

import pytest
import torch
from helpers import REPO
from test_data import needs_mnist

from geco_core import CheckpointError, ConfigError
from geco_core.config import Config, load_config
from geco_core.training import CHECKPOINT, build, load_checkpoint, read_metrics, resume, train

TINY = {
    "data": {"name": "shapes", "n": 256, "size": 16},
    "model": {"name": "mlp-vae", "latent_dim": 4, "hidden": [64]},
    "objective": {"name": "geco", "geco": {"alpha": 0.9, "lr": 2.0}},
    "constraints": [{"name": "re", "kappa": 0.15}],
    "train": {"steps": 20, "batch_size": 32, "log_every": 2, "checkpoint_every": 5},
    "logging": {"progress": False, "eval_examples": 64},
}


def config(**sections) -> Config:
    doc = copy.deepcopy(TINY)
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(doc.get(section), dict):
            doc[section].update(values)
        else:
            doc[section] = values
    return Config.from_dict(doc)


def digest(path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_run_folder_holds_config_metrics_tensorboard_checkpoint_summary_and_plots(tmp_path):
    run = train(config=config(), run_dir=tmp_path / "run")
    assert Config.from_dict(tomllib.loads((run / "config.toml").read_text())) == config()
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(2, 21, 2))
    assert {"kl", "rmse", "loss", "re/c_hat", "re/c_ma", "re/lambda", "re/beta", "re/reached"} <= set(metrics[-1])
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert load_checkpoint(run / CHECKPOINT)["step"] == 20
    summary = json.loads((run / "summary.json").read_text())
    (row,) = summary["constraints"]
    assert row["component"] == "re" and row["kappa"] == 0.15 and row["status"] in ("met", "at bound", "violated")
    assert summary["heldout"]["examples"] == 64 and summary["heldout"]["split"] == "test"
    for plot in summary["plots"].values():
        assert plot.endswith(".png") and os.path.getsize(plot) > 5000


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    straight = train(config=config(train={"steps": 24}), run_dir=tmp_path / "straight")
    half = train(config=config(train={"steps": 12}), run_dir=tmp_path / "half")
    resume(half, steps=24)
    a, b = load_checkpoint(straight / CHECKPOINT), load_checkpoint(half / CHECKPOINT)
    assert a["step"] == b["step"] == 24
    for section in ("model", "objective"):
        for key, value in a[section].items():
            assert torch.equal(value, b[section][key]), (section, key)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert read_metrics(straight) == read_metrics(half)  # every logged value, both halves


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    run = train(config=config(train={"steps": 12, "checkpoint_every": 5}), run_dir=tmp_path / "run")
    # the checkpoint is at 12 (the end); fake a crash after step 10's checkpoint: log lines past it
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines + [json.dumps({"step": 14, "kl": 0.0})]) + "\n")
    resume(run, steps=16)
    assert [m["step"] for m in read_metrics(run)] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert read_metrics(run)[6]["kl"] != 0.0


def test_a_checkpoint_write_that_dies_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import geco_core.training as training

    calls = {"n": 0}
    real_save = torch.save

    def dying_save(obj, f):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint: write half of it, then the process "dies"
            f.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt
        real_save(obj, f)

    monkeypatch.setattr(training.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(config=config(), run_dir=tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 10  # the second one, whole


def test_a_truncated_checkpoint_fails_clearly_and_nothing_in_the_run_is_touched(tmp_path):
    run = train(config=config(), run_dir=tmp_path / "run")
    ckpt = run / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = digest(run)
    with pytest.raises(CheckpointError, match=r"latest.pt is unreadable \(truncated or corrupt\?\)"):
        resume(run, steps=40)
    assert digest(run) == before


def test_a_checkpoint_from_another_model_is_refused(tmp_path):
    run = train(config=config(), run_dir=tmp_path / "run")
    exp = build(config(model={"latent_dim": 6}))
    with pytest.raises(CheckpointError, match="does not fit this run's config"):
        exp.load_state_dict(load_checkpoint(run / CHECKPOINT))


def test_training_into_a_used_run_folder_is_refused(tmp_path):
    run = train(config=config(), run_dir=tmp_path / "run")
    before = digest(run)
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        train(config=config(), run_dir=run)
    assert digest(run) == before


@pytest.mark.parametrize("objective", ["elbo", "beta", "annealed-beta"])
def test_every_objective_trains_and_its_loss_falls(tmp_path, objective):
    cfg = config(objective={"name": objective, "beta": 2.0, "anneal_steps": 30}, train={"steps": 60, "log_every": 1})
    metrics = read_metrics(train(config=cfg, run_dir=tmp_path / objective))
    first, last = [m["loss"] for m in metrics[:5]], [m["loss"] for m in metrics[-5:]]
    assert sum(last) / 5 < sum(first) / 5
    if objective == "annealed-beta":
        assert metrics[0]["beta"] > metrics[29]["beta"] and metrics[-1]["beta"] == pytest.approx(0.7)


def test_lambda_rises_while_violated_and_falls_while_satisfied(tmp_path):
    def run(kappa: float, name: str):
        cfg = config(constraints=[{"name": "re", "kappa": kappa}], train={"log_every": 1})
        return read_metrics(train(config=cfg, run_dir=tmp_path / name))

    hard, easy = run(0.01, "hard"), run(0.9, "easy")
    up = [m["re/lambda"] for m in hard]
    down = [m["re/lambda"] for m in easy]
    assert all(b > a for a, b in zip(up, up[1:])) and all(m["re/c_ma"] > 0 for m in hard)
    assert all(b < a for a, b in zip(down, down[1:])) and all(m["re/c_ma"] < 0 for m in easy)


def test_stacked_constraints_get_one_multiplier_each_with_their_own_step_size(tmp_path):
    image = {"name": "re", "kappa": 0.01, "lr": 1.0}
    channels = {"name": "re", "kappa": 0.01, "lr": 3.0, "per": "channel"}
    cfg = config(constraints=[image, channels])
    last = read_metrics(train(config=cfg, run_dir=tmp_path / "run"))[-1]
    assert {"re/lambda", "re[0]/lambda", "re[1]/lambda", "re[2]/lambda"} <= set(last)
    ratio = math.log(last["re[0]/lambda"]) / math.log(last["re/lambda"])
    assert 2.0 < ratio < 4.5  # three times the step on comparable violations


@needs_mnist
def test_geco_re_on_mnist_holds_the_running_rmse_within_ten_percent_of_kappa(tmp_path):
    kappa = 0.2
    cfg = Config.from_dict(
        {
            "data": {"name": "mnist"},
            "model": {"name": "mlp-vae", "latent_dim": 16, "hidden": [256]},
            "objective": {"name": "geco", "geco": {"alpha": 0.9, "lr": 3.0}},
            "constraints": [{"name": "re", "kappa": kappa}],
            "train": {"steps": 1200, "batch_size": 64, "lr": 2e-3, "log_every": 10},
            "logging": {"progress": False, "plots": False, "tensorboard": False, "eval_examples": 2000},
        }
    )
    run = train(config=cfg, run_dir=tmp_path / "mnist")
    metrics = read_metrics(run)
    running = {m["step"]: m["re/reached"] for m in metrics}  # RMSE from the moving average
    assert running[10] > 1.5 * kappa  # it starts far away...
    late = [v for s, v in running.items() if s >= 600]
    assert all(0.9 * kappa <= v <= 1.1 * kappa for v in late), (min(late), max(late))  # ...and stays close
    heldout = json.loads((run / "summary.json").read_text())["heldout"]
    assert heldout["rmse"] == pytest.approx(kappa, rel=0.1)


@needs_mnist
@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_trains(tmp_path, path):
    """Each shipped config, with its steps reduced to 3 (the long runs are verified in the slow tier)."""
    short = ["train.steps=3", "train.log_every=1", "logging.eval_examples=16", "logging.progress=false"]
    cfg = load_config(path, short)
    run = train(config=cfg, run_dir=tmp_path / path.stem)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trained_steps"] == 3 and summary["constraints"]
    assert all(math.isfinite(m["loss"]) for m in read_metrics(run))


@pytest.mark.parametrize(
    "c_ma, reached, kappa, status",
    [
        (-0.01, 0.09, 0.1, "met"),
        (0.001, 0.101, 0.1, "at bound"),  # an upper bound (RE) a hair above kappa
        (0.001, 0.895, 0.9, "at bound"),  # a lower bound (CLA) a hair below kappa
        (0.02, 0.2, 0.1, "violated"),
        (0.05, 0.5, 0.9, "violated"),
        (0.01, None, None, "violated"),
    ],
)
def test_summary_status_is_met_at_bound_or_violated_for_upper_and_lower_bounds(c_ma, reached, kappa, status):
    from geco_core.summary import _status

    assert _status(c_ma, reached, kappa) == status
