"""`geco train` and `geco resume` under torchrun: two gloo processes with half of every global batch
against one process with all of it; one run folder; resume at the same and at another world size."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import tomli_w
import torch
from helpers import REPO, records
from test_training import TINY

from geco_core.training import CHECKPOINT, load_checkpoint

TESTS = REPO / "tests"
DOC = copy.deepcopy(TINY)
DOC["model"] = {"name": "test-deterministic-vae", "latent_dim": 4, "hidden": [64]}
DOC["train"].update(steps=12, checkpoint_every=6, log_every=2, batch_size=32)
DOC["logging"].update(plots=False, tensorboard=False)
# float32 sums over the whole batch and over two halves differ in their last bits; after 12 Adam steps
# the weights agree to this (absolute, on weights of order 0.1) and lambda, c_ma to RTOL
ATOL, RTOL = 1e-5, 1e-5
#: what libstdc++ prints when gloo's threads are torn down badly at a process's exit
TEARDOWN_ABORT = "terminate called without an active exception"


def env() -> dict[str, str]:
    plugins = os.environ.get("GECO_PLUGINS", "") + ",deterministic_model"
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "GECO_PLUGINS": plugins, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def geco(*args, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "geco_core.cli"]
    if processes > 1:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "geco_core.cli",
        ]  # fmt: skip
    out = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, env=env(), timeout=600)
    assert out.returncode == 0 and TEARDOWN_ABORT not in out.stderr, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module", autouse=True)
def deterministic_model_registered():
    """The test model in this process too (its run folders name it)."""
    from geco_core import registry

    before = os.environ.get("GECO_PLUGINS", "")
    os.environ["GECO_PLUGINS"] = env()["GECO_PLUGINS"]
    registry.cache_clear()
    yield
    os.environ["GECO_PLUGINS"] = before
    registry.cache_clear()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(tomli_w.dumps(DOC))
    return path


def assert_same_state(a: dict, b: dict) -> None:
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=ATOL, rtol=0, msg=key)
    for key in ("geco.log_lambdas", "geco.c_ma"):
        torch.testing.assert_close(b["objective"][key], a["objective"][key], rtol=RTOL, atol=1e-7, msg=key)
    assert a["step"] == b["step"]


def test_two_processes_with_half_batches_train_as_one_process_with_whole_batches(tmp_path, config):
    one, two = tmp_path / "one", tmp_path / "two"
    single = geco("train", config, "--run-dir", one)
    double = geco("train", config, "--run-dir", two, processes=2)
    assert_same_state(load_checkpoint(one / CHECKPOINT), load_checkpoint(two / CHECKPOINT))
    # one run folder, written by process 0 only; the summary printed once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert double.stdout.count("held-out (test") == single.stdout.count("held-out (test") == 1
    # the logged metrics are those of the whole global batch
    for a, b in zip(records(one), records(two)):
        assert a["step"] == b["step"]
        for key in ("kl", "rmse", "test-mae/c_ma", "test-mae/lambda"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    state = load_checkpoint(two / CHECKPOINT)
    assert len(state["rng_ranks"]) == 2 and not torch.equal(
        state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"]
    )


def test_a_distributed_run_resumes_exactly_and_at_another_world_size(tmp_path, config):
    straight, half, single = tmp_path / "straight", tmp_path / "half", tmp_path / "single"
    geco("train", config, "--run-dir", straight, processes=2)
    geco("train", config, "--run-dir", half, "--set", "train.steps=6", processes=2)
    geco("resume", half, "--steps", "12", processes=2)
    a, b = load_checkpoint(straight / CHECKPOINT), load_checkpoint(half / CHECKPOINT)
    for section in ("model", "objective", "optimizer"):
        assert str(a[section]) == str(b[section])  # the same world size: bit for bit
    geco("train", config, "--run-dir", single, "--set", "train.steps=6", processes=2)
    geco("resume", single, "--steps", "12")  # one process takes over the same global batches
    assert_same_state(a, load_checkpoint(single / CHECKPOINT))


def test_a_global_batch_that_does_not_divide_is_refused_with_one_line(tmp_path, config):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "geco_core.cli"]  # fmt: skip
    args = ["train", str(config), "--run-dir", str(tmp_path / "run"), "--set", "train.batch_size=33"]
    out = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env(), timeout=600)
    assert out.returncode != 0
    assert "geco: error: train.batch_size = 33 does not divide into 2 processes" in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_process_knows_its_place_from_torchruns_environment_before_it_joins(monkeypatch):
    """What the CLI asks before `train()` joins the group and after it leaves: print once, exit without
    finalisation under torchrun."""
    from geco_core.training.distributed import launched

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    alone = launched()
    assert (alone.rank, alone.world, alone.main, alone.distributed) == (0, 1, True, False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    fourth = launched()
    assert (fourth.rank, fourth.world, fourth.local_rank, fourth.main, fourth.distributed) == (3, 4, 1, False, True)
