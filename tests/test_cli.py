"""The ``geco`` command as a user runs it: exit codes, one-line errors without a traceback, and the
summary at the end of a run."""

from __future__ import annotations

import hashlib
import json
import tomllib

import pytest
import tomli_w
from test_training import TINY


def write_config(tmp_path, doc=TINY, name="tiny.toml"):
    path = tmp_path / name
    path.write_text(tomli_w.dumps(doc))
    return path


def assert_user_error(out, *fragments):
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("geco: error:")]
    assert len(lines) == 1, out.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_train_prints_the_summary_table_and_the_plot_paths(tmp_path, geco_cli):
    sets = ["--set", "train.steps=6", "--set", "train.log_every=3"]
    out = geco_cli("train", write_config(tmp_path), "--run-dir", tmp_path / "run", *sets)
    assert out.returncode == 0, out.stderr
    header = next(l for l in out.stdout.splitlines() if l.startswith("constraint"))
    assert header.split() == ["constraint", "kappa", "reached", "held-out", "status", "lambda", "beta"]
    row = out.stdout.splitlines()[out.stdout.splitlines().index(header) + 1].split()
    assert row[:2] == ["test-mae", "0.1500"]
    assert str(tmp_path / "run" / "plots" / "trajectory.png") in out.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "train.steps=-1"], ["train.steps must be > 0, got -1"]),
        (["--set", "constraints.0.kappa=0"], ["constraints[0]", "kappa must be a pixel MAE > 0"]),
        (["--set", "model.name='unet'"], ["unknown model 'unet'"]),
        (["--set", "data.n=-3"], ["data.n must be an integer >= 1, got -3"]),
        (["--set", "steps"], ["--set expects section.key=value"]),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, geco_cli, args, fragments):
    out = geco_cli("train", write_config(tmp_path), "--run-dir", tmp_path / "run", *args)
    assert_user_error(out, *fragments)
    assert not (tmp_path / "run").exists()


def test_print_config_shows_the_resolved_config_with_every_default_and_trains_nothing(tmp_path, geco_cli):
    from geco_core.training.config import Config

    doc = {**TINY, "logging": {**TINY["logging"], "dir": str(tmp_path / "runs")}}
    out = geco_cli("train", write_config(tmp_path, doc), "--print-config", "--set", "train.lr=0.0042")
    assert out.returncode == 0, out.stderr
    printed = tomllib.loads(out.stdout)
    assert out.stdout.startswith("# geco ") and printed["train"]["lr"] == 0.0042
    assert {"validation", "validate_every", "seed", "precision"} <= set(printed["train"])  # defaults written out
    assert "tensorboard" in printed["logging"] and "alpha" in printed["objective"]["geco"]
    expected = {**doc, "train": {**doc["train"], "lr": 0.0042}}
    assert Config.from_dict(printed) == Config.from_dict(expected)
    assert not (tmp_path / "runs").exists()


def test_every_help_shows_the_defaults_and_a_wrong_option_is_told_with_its_commands_usage():
    import argparse
    import contextlib
    import io

    from geco_core.cli import build_parser, main

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            default = action.default
            said = isinstance(default, int | float | str) and default is not False and default != argparse.SUPPRESS
            if action.option_strings and said:
                assert f"default: {default}" in " ".join(text.split()), (name, action.dest)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(["train", "x.toml", "--bogus"])
    lines = err.getvalue().splitlines()
    assert exit_.value.code == 2 and lines[0].startswith("usage: geco train")
    assert lines[-1] == "geco train: error: unrecognized arguments: --bogus"


def test_missing_data_files_are_a_user_error_naming_the_files(tmp_path, geco_cli):
    doc = {**TINY, "data": {"name": "mnist", "root": str(tmp_path / "empty"), "download": False}}
    out = geco_cli("train", write_config(tmp_path, doc), "--run-dir", tmp_path / "run")
    assert_user_error(out, "missing train-images-idx3-ubyte.gz", str(tmp_path / "empty" / "MNIST" / "raw"))
    assert not (tmp_path / "run").exists()


def test_a_missing_config_file_is_a_user_error(tmp_path, geco_cli):
    assert_user_error(geco_cli("train", tmp_path / "nope.toml"), "nope.toml does not exist")


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path, geco_cli):
    assert_user_error(geco_cli("resume", tmp_path), "is not a run folder (no config.toml)")


def test_resume_of_a_truncated_checkpoint_exits_2_and_leaves_the_run_as_it_was(tmp_path, geco_cli):
    run = tmp_path / "run"
    assert geco_cli("train", write_config(tmp_path), "--run-dir", run, "--set", "train.steps=4").returncode == 0
    ckpt = run / "checkpoints" / "latest.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    assert_user_error(geco_cli("resume", run, "--steps", "8"), "unreadable (truncated or corrupt?)")
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()} == before


def test_resume_continues_a_run_to_more_steps(tmp_path, geco_cli):
    run = tmp_path / "run"
    assert geco_cli("train", write_config(tmp_path), "--run-dir", run, "--set", "train.steps=4").returncode == 0
    out = geco_cli("resume", run, "--steps", "8")
    assert out.returncode == 0, out.stderr
    assert "8 steps (4 now" in out.stdout
    assert "steps = 8" in (run / "config.toml").read_text()


def test_every_kind_of_plugin_has_a_list_command_named_in_the_plural():
    from geco_core.cli import build_parser
    from geco_core.plugins import HOOKS

    commands = set(next(a for a in build_parser()._actions if a.dest == "command").choices)
    lists = {"constraints", "controllers", "models", "datasets", "objectives", "features"}
    assert len(HOOKS) == len(lists) and lists <= commands and "featuress" not in commands


def test_models_and_datasets_are_listed(geco_cli):
    models, datasets = geco_cli("models"), geco_cli("datasets")
    assert models.returncode == datasets.returncode == 0
    assert {"conv-vae", "mlp-vae"} <= {l.split()[0] for l in models.stdout.splitlines()[1:]}
    assert {"shapes", "mnist", "fashion-mnist", "color-mnist", "mnist-triplets", "cifar10", "celeba"} <= {
        l.split()[0] for l in datasets.stdout.splitlines()[1:]
    }


def test_a_closed_output_pipe_stops_the_run_with_one_line(tmp_path):
    """`geco train --json | head -1`: when the reader goes away the run stops with one line on
    stderr and exit code 141 (128 + SIGPIPE), not a traceback."""
    import subprocess
    import sys

    config = write_config(tmp_path, {**TINY, "train": {**TINY["train"], "log_every": 1}})
    cmd = [sys.executable, "-m", "geco_core.cli", "train", str(config), "--json", "--set", "train.steps=100000"]
    proc = subprocess.Popen([*cmd, "--run-dir", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(proc.stdout.readline())["step"] == 1
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("geco: stopped:")


def test_logs_read_well_outside_a_terminal_and_for_scripts(tmp_path, geco_cli):
    """Not on a terminal: plain progress lines on stderr, not a carriage-return bar; --json: one
    JSON object per logged step and then the summary on stdout; --quiet: only the run folder."""
    import json

    config = write_config(tmp_path, {**TINY, "logging": {"progress": True, "eval_examples": 16}})
    plain = geco_cli("train", config, "--set", "train.steps=40", "--run-dir", tmp_path / "plain")
    assert plain.returncode == 0 and "\r" not in plain.stderr
    lines = [line for line in plain.stderr.splitlines() if ": step " in line]
    assert 2 <= len(lines) <= 21 and lines[-1].startswith("plain: step 40/40 (100%") and "KL " in lines[-1]
    as_json = geco_cli("train", config, "--set", "train.steps=10", "--json", "--run-dir", tmp_path / "json")
    objects = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [o["step"] for o in objects[:-1]] == [2, 4, 6, 8, 10] and objects[-1]["status"] == "finished"
    assert as_json.stderr.count(": step ") == 0
    quiet = geco_cli("train", config, "--set", "train.steps=4", "--quiet", "--run-dir", tmp_path / "quiet")
    assert quiet.stdout.strip() == str(tmp_path / "quiet") and ": step " not in quiet.stderr
