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
from helpers import REPO, needs_plugins, records
from test_data import needs_mnist

from geco_core import CheckpointError, ConfigError, RunFolderError, create
from geco_core.plugins import Entry, registry
from geco_core.state import component_status
from geco_core.training import CHECKPOINT, build, load_checkpoint, resume, train
from geco_core.training.config import Config, load_config

TINY = {
    "data": {"name": "shapes", "n": 256, "size": 16},
    "model": {"name": "mlp-vae", "latent_dim": 4, "hidden": [64]},
    "objective": {"name": "geco", "geco": {"alpha": 0.9, "lr": 2.0, "controller": "paper"}},
    "constraints": [{"name": "test-mae", "kappa": 0.15}],
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
    metrics = records(run)
    assert [m["step"] for m in metrics] == list(range(2, 21, 2))
    assert {
        "kl",
        "rmse",
        "loss",
        "test-mae/c_hat",
        "test-mae/c_ma",
        "test-mae/lambda",
        "test-mae/beta",
        "test-mae/reached",
    } <= set(metrics[-1])
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert load_checkpoint(run / CHECKPOINT)["step"] == 20
    summary = json.loads((run / "summary.json").read_text())
    (row,) = summary["constraints"]
    assert row["component"] == "test-mae" and row["kappa"] == 0.15
    assert row["status"] == component_status(row["c_ma"], row["reached"], 0.15)  # what its moving average says
    assert row["lambda"] == pytest.approx(metrics[-1]["test-mae/lambda"]) and row["beta"] == pytest.approx(
        1 / row["lambda"]
    )
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
            assert torch.equal(value, b[section][key]) if torch.is_tensor(value) else value == b[section][key], key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert records(straight) == records(half)  # every logged value, both halves


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    run = train(config=config(train={"steps": 12, "checkpoint_every": 5}), run_dir=tmp_path / "run")
    # the checkpoint is at 12 (the end); fake a crash after step 10's checkpoint: log lines past it
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines + [json.dumps({"step": 14, "kl": 0.0})]) + "\n")
    resume(run, steps=16)
    assert [m["step"] for m in records(run)] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert records(run)[6]["kl"] != 0.0


def test_a_checkpoint_write_that_dies_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import geco_core.training.run as run_module

    calls = {"n": 0}
    real_save = torch.save

    def dying_save(obj, f):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint: write half of it, then the process "dies"
            f.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt
        real_save(obj, f)

    monkeypatch.setattr(run_module.torch, "save", dying_save)
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
    with pytest.raises(RunFolderError, match="already exists and is not empty"):
        train(config=config(), run_dir=run)
    assert digest(run) == before


def test_run_folder_mistakes_are_run_folder_errors_not_config_errors(tmp_path):
    from geco_core.training import Run

    (tmp_path / "file").write_text("x")
    run = Run(tmp_path, config())
    for mistake in (
        lambda: Run.open(tmp_path / "missing"),
        lambda: Run.create(config(), tmp_path / "file"),
        lambda: Run.create(config(logging={"dir": str(tmp_path / "file" / "runs")})),
    ):
        with pytest.raises(RunFolderError) as info:
            mistake()
        assert not isinstance(info.value, ConfigError)
    with run.lock(), pytest.raises(RunFolderError, match="in use by another geco process"), run.lock():
        pass


@pytest.mark.parametrize("objective", ["elbo", "beta", "annealed-beta"])
def test_every_objective_trains_and_its_loss_falls(tmp_path, objective):
    options = {"beta": {"beta": 2.0}, "annealed-beta": {"anneal_steps": 30}}.get(objective, {})
    cfg = config(objective={"name": objective, **options}, train={"steps": 60, "log_every": 1})
    metrics = records(train(config=cfg, run_dir=tmp_path / objective))
    first, last = [m["loss"] for m in metrics[:5]], [m["loss"] for m in metrics[-5:]]
    assert sum(last) / 5 < sum(first) / 5
    if objective == "annealed-beta":
        assert metrics[0]["beta"] > metrics[29]["beta"] and metrics[-1]["beta"] == pytest.approx(0.7)


def test_lambda_rises_while_violated_and_falls_while_satisfied(tmp_path):
    def run(kappa: float, name: str):
        cfg = config(constraints=[{"name": "test-mae", "kappa": kappa}], train={"log_every": 1})
        return records(train(config=cfg, run_dir=tmp_path / name))

    hard, easy = run(0.005, "hard"), run(0.9, "easy")
    up = [m["test-mae/lambda"] for m in hard]
    down = [m["test-mae/lambda"] for m in easy]
    assert all(b > a for a, b in zip(up, up[1:])) and all(m["test-mae/c_ma"] > 0 for m in hard)
    assert all(b < a for a, b in zip(down, down[1:])) and all(m["test-mae/c_ma"] < 0 for m in easy)


def test_stacked_constraints_get_one_multiplier_each_with_their_own_step_size(tmp_path):
    slow = {"name": "test-mae", "kappa": 0.005, "lr": 1.0}
    fast = {"name": "test-mae", "kappa": 0.005, "lr": 3.0}
    cfg = config(constraints=[slow, fast])
    last = records(train(config=cfg, run_dir=tmp_path / "run"))[-1]
    assert {"test-mae/lambda", "test-mae#2/lambda"} <= set(last)
    ratio = math.log(last["test-mae#2/lambda"]) / math.log(last["test-mae/lambda"])
    assert ratio == pytest.approx(3.0, rel=1e-4)  # the same violations, three times the step


@needs_mnist
@needs_plugins
def test_geco_re_on_mnist_holds_the_running_rmse_within_ten_percent_of_kappa(tmp_path):
    kappa = 0.2
    cfg = Config.from_dict(
        {
            "data": {"name": "mnist"},
            "model": {"name": "mlp-vae", "latent_dim": 16, "hidden": [256]},
            "objective": {"name": "geco", "geco": {"alpha": 0.9, "lr": 3.0, "controller": "paper"}},
            "constraints": [{"name": "re", "kappa": kappa}],
            "train": {"steps": 1200, "batch_size": 64, "lr": 2e-3, "log_every": 10},
            "logging": {"progress": False, "plots": False, "tensorboard": False, "eval_examples": 2000},
        }
    )
    run = train(config=cfg, run_dir=tmp_path / "mnist")
    metrics = records(run)
    running = {m["step"]: m["re/reached"] for m in metrics}  # RMSE from the moving average
    assert running[10] > 1.5 * kappa  # it starts far away...
    late = [v for s, v in running.items() if s >= 600]
    assert all(0.9 * kappa <= v <= 1.1 * kappa for v in late), (min(late), max(late))  # ...and stays close
    heldout = json.loads((run / "summary.json").read_text())["heldout"]
    assert heldout["rmse"] == pytest.approx(kappa, rel=0.1)


@needs_mnist
@needs_plugins
@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_trains(tmp_path, path):
    """Each shipped config, with its steps reduced to 3 (the long runs are verified in the slow tier)."""
    short = ["train.steps=3", "train.log_every=1", "logging.eval_examples=16", "logging.progress=false"]
    cfg = load_config(path, short)
    run = train(config=cfg, run_dir=tmp_path / path.stem)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trained_steps"] == 3 and summary["constraints"]
    assert all(math.isfinite(m["loss"]) for m in records(run))


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
def test_component_status_is_met_at_bound_or_violated_for_upper_and_lower_bounds(c_ma, reached, kappa, status):
    assert component_status(c_ma, reached, kappa) == status


def test_component_status_is_unreachable_when_held_and_diverged_after_a_non_finite_batch():
    assert component_status(0.02, 0.2, 0.1, unreachable=True) == "unreachable"
    assert component_status(0.001, 0.101, 0.1, unreachable=True) == "at bound"  # within 2% of kappa
    assert component_status(-0.01, 0.09, 0.1, unreachable=True, finite=False) == "diverged"


LEGACY_CONFIG = """\
constraints = [
    { name = "test-mae", kappa = 0.15 },
]

[data]
name = "shapes"
seed = 0
download = true
n = 256
size = 16

[model]
name = "mlp-vae"
latent_dim = 4
hidden = [64]

[objective]
name = "geco"
likelihood = "gaussian"
sigma = 0.1
learn_sigma = true
beta = 1.0
beta_start = 2.0
beta_end = 0.7
anneal_steps = 10000

[objective.geco]
alpha = 0.9
lr = 2.0
lambda_init = 1.0
warmup = 0
strict = false

[train]
steps = 20
batch_size = 32
lr = 0.001
seed = 0
device = "auto"
precision = "float32"
checkpoint_every = 5
log_every = 2

[logging]
dir = "runs"
tensorboard = true
progress = false
plots = true
eval_examples = 64
"""


def test_a_run_folder_written_by_geco_0_1_0_resumes_with_algorithm_1_as_it_was_trained(tmp_path):
    """0.1.0 wrote every objective's options into [objective] and had no controllers, nor component
    names in GECO's state: such a run is read, keeps the paper's controller, and continues exactly."""
    then = {"validation": 0}  # 0.1.0 had no validation split
    straight = train(config=config(train={"steps": 30, **then}), run_dir=tmp_path / "straight")
    old = train(config=config(train={"steps": 20, **then}), run_dir=tmp_path / "old")
    (old / "config.toml").write_text(LEGACY_CONFIG)
    state = load_checkpoint(old / CHECKPOINT)
    del state["objective"]["geco._extra_state"]  # 0.1.0 stored the multipliers by position only
    torch.save(state, old / CHECKPOINT)
    resume(old, steps=30)
    upgraded = load_config(old / "config.toml")
    assert upgraded.objective.options["controller"] == "paper" and "likelihood" in upgraded.objective.tables["elbo"]
    a, b = load_checkpoint(straight / CHECKPOINT), load_checkpoint(old / CHECKPOINT)
    for key in ("geco.log_lambdas", "geco.c_ma"):
        assert torch.equal(a["objective"][key], b["objective"][key]), key


def test_a_run_folder_names_the_version_that_wrote_it_and_the_upgrade_is_keyed_by_it(tmp_path):
    """config.toml's first line names the geco that wrote it; a document of 0.4.0 or later is read as
    it is, while the same document with no version (before 0.4.0) is upgraded by its contents."""
    from geco_core import __version__
    from geco_core.training.upgrade import CURRENT_FORMAT, upgrade_resolved, written_by

    run = train(config=config(train={"steps": 2}), run_dir=tmp_path / "run")
    text = (run / "config.toml").read_text()
    assert text.startswith(f"# geco {__version__}:") and load_config(run / "config.toml", resolved=True) == config(
        train={"steps": 2}
    )
    assert written_by("# geco 0.4.0: the resolved config\n") == (0, 4, 0) and written_by("[data]\n") is None
    doc = tomllib.loads(text)
    del doc["train"]["validation"]  # as 0.2.0 wrote it: no validation split
    assert upgrade_resolved(copy.deepcopy(doc), None)["train"]["validation"] == 0
    assert "validation" not in upgrade_resolved(copy.deepcopy(doc), CURRENT_FORMAT)["train"]
    doc["objective"]["geco"]["controller"] = {"name": "normalised", "step": 0.1}  # 0.3.0's controller
    del doc["objective"]["geco"]["formulation"]  # which 0.3.0 did not have
    geco = upgrade_resolved(copy.deepcopy(doc), None)["objective"]["geco"]
    assert geco["controller"] == {"name": "scaled", "step": 0.1, "margin": 0.02} and geco["formulation"] == "normalised"


def test_the_trainer_owns_the_run_state_and_callbacks_only_observe_it(tmp_path):
    """A run resumed with the Summary callback alone (no metrics file, no checkpoints) summarises
    the whole run as one resumed with every default callback: the records up to the checkpoint
    are the trainer's, not the metrics file callback's."""
    import shutil

    from geco_core.training.callbacks import Summary

    first = train(config=config(train={"steps": 10}), run_dir=tmp_path / "a")
    shutil.copytree(first, tmp_path / "b")
    resume(tmp_path / "a", steps=20)
    resume(tmp_path / "b", steps=20, callbacks=[Summary()])
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("a", "b"))
    different = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert different <= {"run", "seconds", "advice", "plots"}, different
    assert a["final"]["step"] == 20 and len(records(tmp_path / "a")) == 10


def test_a_cpu_experiment_keeps_freed_memory_in_the_process(monkeypatch):
    """build() on a CPU tells glibc to keep freed blocks (the allocator setting measured in
    docs/BENCHMARKS.md), and on Linux the setting is accepted."""
    import sys

    import geco_core.training.machine as machine
    from geco_core.training.machine import keep_freed_memory

    calls = []
    monkeypatch.setattr(machine, "keep_freed_memory", lambda: calls.append(1) or True)
    build(config())
    assert calls == [1]
    if sys.platform.startswith("linux"):
        assert keep_freed_memory() is True


def test_free_cores_counts_the_cores_that_other_runnable_tasks_leave(tmp_path, monkeypatch):
    """Cores allowed minus the runnable tasks other than the reader (median of the samples), at
    least 1; every allowed core where the kernel's count cannot be read."""
    from geco_core.training.machine import free_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.50 0.40 0.30 3/412 9999\n")  # this reader and two others
    assert free_cores(samples=3, interval=0.0, loadavg=str(loadavg)) == 2
    loadavg.write_text("9.00 9.00 9.00 12/412 9999\n")
    assert free_cores(samples=1, loadavg=str(loadavg)) == 1  # never fewer than one
    assert free_cores(samples=1, loadavg=str(tmp_path / "missing")) == 4


def test_a_run_without_train_threads_uses_the_free_cores_and_an_explicit_setting_wins(monkeypatch):
    import geco_core.training.machine as machine

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(machine, "free_cores", lambda: 1)  # another process is busy
        build(config())
        assert torch.get_num_threads() == 1
        build(config(train={"threads": 2}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_callbacks_run_after_those_they_declare_in_any_given_order_and_write_the_same_run(tmp_path):
    """Summary records the plots' paths (after Plots): shuffled, the default callbacks still run in
    such an order and the run's files are the same."""
    import random

    from geco_core.training import default_callbacks, in_order
    from geco_core.training.callbacks import Plots, Summary

    cfg = config()

    def shuffled_by(seed: int) -> list:
        chosen = default_callbacks(cfg)
        random.Random(seed).shuffle(chosen)
        return chosen

    def summary_first(chosen: list) -> bool:
        kinds = [type(c) for c in chosen]
        return kinds.index(Summary) < kinds.index(Plots)

    assert not any(summary_first(in_order(shuffled_by(seed))) for seed in range(30))
    shuffled = next(c for c in map(shuffled_by, range(100)) if summary_first(c))  # in_order must fix it
    runs = [
        train(config=cfg, run_dir=tmp_path / "listed"),
        train(config=cfg, run_dir=tmp_path / "shuffled", callbacks=shuffled),
    ]
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    assert set(summaries[1]["plots"]) == {"trajectory", "grid"}
    for run, s in zip(runs, summaries):
        s.pop("run"), s.pop("seconds"), s.pop("plots")
        s["advice"] = [line.replace(str(run), "<run>") for line in s["advice"]]  # names its config's path
    assert summaries[0] == summaries[1] and records(runs[0]) == records(runs[1])


def test_callbacks_that_wait_on_each_other_are_refused():
    from geco_core.training import Callback, in_order

    class A(Callback):
        pass

    class B(Callback):
        after = (A,)

    A.after = (B,)
    with pytest.raises(ValueError, match="callbacks wait on each other: A, B"):
        in_order([A(), B()])


def test_a_missing_test_split_is_an_error_before_anything_is_written_not_a_silent_fallback(tmp_path, monkeypatch):
    """The summary and the plots evaluate held-out data: where the test split cannot be loaded the
    run stops before its folder exists (it used to evaluate on the training data without a word)."""
    from geco_core import DataError
    from geco_core.data.shapes import shapes

    def train_only(split: str = "train", seed: int = 0, n: int | None = None, size: int = 32):
        """Shapes whose test files are missing."""
        if split == "test":
            raise DataError("train-only: missing test.bin in /nowhere")
        return shapes(split, seed, n, size)

    entry = Entry("dataset", "train-only", train_only, "test", "test", "0", "train only")
    monkeypatch.setitem(registry().entries["dataset"], "train-only", entry)
    doc = copy.deepcopy(TINY)
    doc["data"]["name"] = "train-only"
    with pytest.raises(DataError, match="held-out \\(test\\) split of 'train-only' cannot be loaded.*test.bin"):
        train(config=Config.from_dict(doc), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    doc["logging"] = {"progress": False, "eval_examples": 0, "plots": False}
    assert (train(config=Config.from_dict(doc), run_dir=tmp_path / "quiet") / "summary.json").is_file()


def test_output_start_mean_starts_at_the_training_splits_mean_and_resumes_exactly(tmp_path, monkeypatch):
    exp = build(config(model={"output_start": "mean"}, train={"validation": 32}))
    mean = exp.data.images.double().div(255).mean(0)  # the training split, the validation split held out
    torch.testing.assert_close(
        exp.model.pixel_bias.detach().double(), torch.logit(mean.clamp(0.01, 0.99)), atol=1e-5, rtol=0
    )
    # a model whose factory takes **kwargs is not handed data_mean; one that names it is
    seen = {}

    def factory(image_shape, data_mean=None, **options):
        seen["data_mean"] = data_mean
        return create("model", "mlp-vae", image_shape=image_shape, **options)

    def catch_all(image_shape, **options):
        seen["options"] = options
        return create("model", "mlp-vae", image_shape=image_shape, **options)

    for name, fn in (("named", factory), ("catch-all", catch_all)):
        monkeypatch.setitem(registry().entries["model"], name, Entry("model", name, fn, "test", "test", "0", name))
        build(config(model={"name": name}))
    assert callable(seen["data_mean"]) and set(seen["options"]) == {"latent_dim", "hidden"}
    # N steps + resume + N steps = 2N steps, with the learned bias in the checkpoint
    whole = train(config=config(model={"output_start": "mean"}, train={"steps": 20}), run_dir=tmp_path / "whole")
    half = train(config=config(model={"output_start": "mean"}, train={"steps": 10}), run_dir=tmp_path / "half")
    resume(half, steps=20)
    a, b = load_checkpoint(whole / CHECKPOINT)["model"], load_checkpoint(half / CHECKPOINT)["model"]
    assert "pixel_bias" in a and all(torch.equal(a[k], b[k]) for k in a)
