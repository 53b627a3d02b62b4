"""What happens when things go wrong: a diverging run, a full disk, a second process, a file in the
way, a missing extra, a hostile checkpoint. Every case ends in one line (exit 2, or 3 for a
diverged run), no traceback, and nothing already written lost or half-written."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import assert_user_error, write_config
from test_training import config

from geco_core import ConfigError
from geco_core.cli import main
from geco_core.errors import CheckpointError
from geco_core.training import CHECKPOINT, Run, RunDiverged, load_checkpoint, resume, train
from geco_core.training.checkpoint import nonfinite_entries


def digest(path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


# --- divergence ------------------------------------------------------------------------------------


def test_a_run_that_diverges_from_the_start_stops_with_one_line_and_writes_no_checkpoint(tmp_path, geco_cli):
    run = tmp_path / "run"
    sets = ["--set", "train.lr=1e3", "--set", "train.steps=60", "--set", "train.checkpoint_every=5"]
    out = geco_cli("train", write_config(tmp_path), "--run-dir", run, *sets)
    assert out.returncode == 3, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("geco: run diverged: 10 steps in a row with a non-finite loss or gradient")
    assert lines[0].endswith("last good checkpoint: none was written")
    assert "DIVERGED" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["nonfinite_steps"] == 10 and summary["step"] == 11
    assert not (run / CHECKPOINT).exists()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_a_run_that_diverges_later_keeps_its_last_good_checkpoint(tmp_path, monkeypatch):
    from geco_core.training.objectives import GecoObjective

    real = GecoObjective.forward
    monkeypatch.setattr(
        GecoObjective,
        "forward",
        lambda self, out, batch, step: real(self, out, batch, step) * (1 if step < 12 else math.nan),
    )
    with pytest.raises(RunDiverged, match=r"last good checkpoint: step 10 in .*latest.pt") as info:
        train(config=config(train={"steps": 100, "checkpoint_every": 5}), run_dir=tmp_path / "run")
    assert "\n" not in str(info.value)
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert state["step"] == 10 and not nonfinite_entries(state)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"


def test_a_non_finite_step_is_skipped_and_counted_and_training_goes_on(tmp_path, monkeypatch):
    from geco_core.training.objectives import GecoObjective

    real = GecoObjective.forward

    def nan_on_two_steps(self, out, batch, step):
        loss = real(self, out, batch, step)
        return loss * math.nan if step in (5, 6) else loss

    monkeypatch.setattr(GecoObjective, "forward", nan_on_two_steps)
    run = train(config=config(train={"steps": 12, "log_every": 1}), run_dir=tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["nonfinite_steps"] == 2
    assert [r["train/nonfinite_steps"] for r in Run.open(run).read_metrics()][4:8] == [0, 1, 2, 2]
    assert not nonfinite_entries(load_checkpoint(run / CHECKPOINT)["model"])


def test_an_enormous_but_finite_gradient_is_skipped_and_the_optimiser_state_stays_finite(tmp_path, monkeypatch):
    """A loss scaled by 1e25 is finite, its gradient too, but the gradient's squares overflow
    float32: the step is skipped and counted (its 2-norm is infinite), training goes on, and Adam's
    second moment never holds infinity (which would freeze the model without a NaN anywhere)."""
    from geco_core.training.objectives import GecoObjective

    real = GecoObjective.forward

    def huge_on_step_five(self, out, batch, step):
        loss = real(self, out, batch, step)
        return loss * 1e25 if step == 5 else loss

    monkeypatch.setattr(GecoObjective, "forward", huge_on_step_five)
    run = train(config=config(train={"steps": 12, "log_every": 1}), run_dir=tmp_path / "run")
    records = Run.open(run).read_metrics()
    assert math.isfinite(records[5]["loss"])  # the loss itself was finite
    assert [r["train/nonfinite_steps"] for r in records][4:8] == [0, 1, 1, 1]
    state = load_checkpoint(run / CHECKPOINT)
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert not nonfinite_entries({k: state[k] for k in ("model", "optimizer")})


def test_a_checkpoint_holding_nan_is_never_written(tmp_path):
    run = Run.create(config(), tmp_path / "run")
    state = {"format": 1, "step": 3, "model": {"w": torch.ones(2)}, "optimizer": {}, "objective": {}}
    run.save_checkpoint(state)
    before = digest(run.path)
    bad = {**state, "step": 4, "optimizer": {"state": {0: {"exp_avg_sq": torch.tensor([1.0, math.inf])}}}}
    with pytest.raises(CheckpointError, match=r"optimizer.state.0.exp_avg_sq holds NaN or infinity"):
        run.save_checkpoint(bad)
    assert digest(run.path) == before


# --- the disk, the folders, the lock ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_nonfinite_entries_finds_exactly_the_tensors_holding_nan_or_infinity(data):
    """Against the naive per-tensor check, on nested states of float32/float64/bfloat16 tensors,
    some holding NaN or ±inf, some huge but finite (whose 2-norm overflows: the screen must not
    report them), and integer tensors (never reported)."""
    state, naive = {}, []
    for i in range(data.draw(st.integers(1, 6))):
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64]))
        n = data.draw(st.integers(0, 50))
        t = (torch.randn(n) * 10 ** data.draw(st.integers(-3, 3))).to(dtype)
        if n and dtype != torch.int64:
            kind = data.draw(st.sampled_from(["plain", "nan", "inf", "-inf", "huge"]))
            where = data.draw(st.integers(0, n - 1))
            t[where] = {"plain": t[where].item(), "nan": math.nan, "inf": math.inf, "-inf": -math.inf,
                        "huge": torch.finfo(dtype).max}[kind]  # fmt: skip
            if kind == "huge":
                t[:] = torch.finfo(dtype).max / 2
        key = f"g{i}"
        state.setdefault("group", {})[key] = [t] if i % 2 else t
        name = f"group.{key}[0]" if i % 2 else f"group.{key}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            naive.append(name)
    assert nonfinite_entries(state) == naive


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import geco_core.training.run as run_module

    run = train(config=config(train={"steps": 5}), run_dir=tmp_path / "run")
    before = (run / CHECKPOINT).read_bytes()

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_module.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="cannot write .*latest.pt: No space left on device"):
        resume(run, steps=10)
    assert (run / CHECKPOINT).read_bytes() == before
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("what", ["binary", "folder"])
def test_a_config_that_is_not_a_text_file_is_one_line(tmp_path, geco_cli, what):
    path = tmp_path / "config.toml"
    if what == "binary":
        path.write_bytes(bytes(range(256)))
    else:
        path.mkdir()
    out = geco_cli("train", path)
    assert_user_error(out, str(path), "not a text" if what == "binary" else "is a folder")


@pytest.mark.parametrize("flag", ["logging.dir", "--run-dir"])
def test_a_file_in_the_way_of_a_run_folder_is_one_line_and_nothing_is_created(tmp_path, geco_cli, flag):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    target = blocker / "sub"
    args = ["--set", f"logging.dir='{target}'"] if flag == "logging.dir" else ["--run-dir", target / "run"]
    out = geco_cli("train", write_config(tmp_path), *args)
    assert_user_error(out, str(blocker))
    assert blocker.read_text() == "a file"


def test_resume_of_a_missing_folder_says_it_does_not_exist(tmp_path, geco_cli):
    assert_user_error(geco_cli("resume", tmp_path / "nope"), "run folder", "does not exist")


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0_or_restarts_in_place(tmp_path, geco_cli):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    assert geco_cli("train", cfg, "--run-dir", run, "--set", "train.steps=4").returncode == 0
    (run / CHECKPOINT).unlink()
    (run / "summary.json").unlink()
    out = geco_cli("resume", run)
    assert out.returncode == 0, out.stderr
    assert "4 steps (4 now" in out.stdout and load_checkpoint(run / CHECKPOINT)["step"] == 4
    # the same again, but started with `geco train` into the same folder and config
    (run / CHECKPOINT).unlink()
    out = geco_cli("train", cfg, "--run-dir", run, "--set", "train.steps=4")
    assert out.returncode == 0, out.stderr


def test_a_second_process_in_the_same_run_folder_is_refused_with_one_line(tmp_path, geco_cli):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    assert geco_cli("train", cfg, "--run-dir", run, "--set", "train.steps=2").returncode == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from geco_core.training import Run\n"
         "with Run.open(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = digest(run)
        assert_user_error(geco_cli("resume", run, "--steps", "4"), str(run), "in use by another geco process")
        assert digest(run) == before
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert geco_cli("resume", run, "--steps", "4").returncode == 0  # the lock went with the process


# --- installation, checkpoints, small things ----------------------------------------------------------


def test_train_without_the_train_extra_names_the_extra_and_creates_nothing(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tomli_w" else real(name, *a))
    code = main(["train", str(write_config(tmp_path)), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "geco train needs the train extra: pip install 'geco-core[train]' (missing: tomli_w)" in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_holding_pickled_objects_is_refused_without_inviting_unsafe_loading(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    path = tmp_path / "latest.pt"
    torch.save({"format": 1, "step": 1, "payload": Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert "holds objects other than tensors" in text and "weights_only" not in text and "\n" not in text
    assert not (tmp_path / "owned").exists()


def test_version_is_printed(geco_cli):
    from geco_core import __version__

    out = geco_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"geco {__version__}"


def test_every_float_option_must_be_finite():
    for key, value in [("train", {"lr": math.inf}), ("objective", {"name": "geco", "geco": {"alpha": math.nan}})]:
        with pytest.raises(ConfigError, match="must be a finite number"):
            config(**{key: value})


def test_metrics_and_summary_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
    from geco_core.training import strict_json

    assert json.loads(strict_json({"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}})) == {
        "a": None,
        "b": [None, 1.0],
        "c": {"d": None},
    }
    run = train(config=config(train={"steps": 4}), run_dir=tmp_path / "run")
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} is not JSON")}
    json.loads((run / "summary.json").read_text(), **strict)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, **strict)
