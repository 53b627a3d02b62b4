"""``geco sweep``: the runs it makes, resuming without redoing finished runs, its report and plots;
and the paper's Figure 2 and 3 plots."""

from __future__ import annotations

import json
import os

import pytest
import tomli_w
import torch
from test_training import TINY

from geco_core.errors import ConfigError
from geco_core.evaluation import plan, plot_information_plane, sweep
from geco_core.figures import save_grids
from geco_core.training import CHECKPOINT

EVAL = {"examples": 32, "marginal_examples": 16}


def _config(tmp_path):
    doc = {**TINY, "train": {**TINY["train"], "steps": 6, "checkpoint_every": 3}}
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def _png_size(path) -> tuple[int, int]:
    import matplotlib.image

    assert path.stat().st_size > 1000
    image = matplotlib.image.imread(path)
    return image.shape[0], image.shape[1]


def test_plan_names_runs_by_objective_and_kappa_and_checks_its_arguments(tmp_path):
    runs = plan([_config(tmp_path)], kappas=[0.1, 0.2], objectives=["elbo", "geco"])
    assert [name for _, name, _ in runs] == ["elbo", "geco-k0.1", "geco-k0.2"]
    assert [c.constraints[0].options["kappa"] for _, _, c in runs] == [0.15, 0.1, 0.2]
    assert [c.objective.name for _, _, c in runs] == ["elbo", "geco", "geco"]
    with pytest.raises(ConfigError, match="--kappa: kappa must be > 0, got -0.1"):
        plan([_config(tmp_path)], kappas=[-0.1])
    with pytest.raises(ConfigError, match="unknown objective 'elbow'"):
        plan([_config(tmp_path)], objectives=["elbow"])
    with pytest.raises(ConfigError, match="no objective among --objectives enforces constraints"):
        plan([_config(tmp_path)], kappas=[0.1], objectives=["elbo"])


def test_a_sweep_trains_evaluates_plots_and_resumes_without_redoing_finished_runs(tmp_path):
    cfg, out = _config(tmp_path), tmp_path / "sweep"
    lines: list[str] = []
    points = sweep(
        [cfg], out, kappas=[0.1, 0.2], objectives=["geco", "elbo"], eval_options=EVAL, log=lines.append, jobs=1
    )
    assert [(p["run"], p["kappa"]) for p in points] == [("geco-k0.1", 0.1), ("geco-k0.2", 0.2), ("elbo", 0.15)]
    assert json.loads((out / "sweep.json").read_text()) == points
    assert (out / "sweep.md").read_text().count("| tiny |") == 3
    assert min(_png_size(out / "information_plane.png")) > 100
    assert min(_png_size(out / "grids-tiny.png")) > 50
    assert sum("trained and evaluated" in line for line in lines) == 3

    # a second sweep keeps finished runs and their evaluations untouched
    runs = [out / "tiny" / p["run"] for p in points]
    stamps = {r: (os.stat(r / CHECKPOINT).st_mtime_ns, os.stat(r / "eval.json").st_mtime_ns) for r in runs}
    # one run interrupted after its checkpoint (no summary yet), one before it (an empty folder)
    (runs[1] / "summary.json").unlink()
    (runs[2] / "summary.json").unlink()
    (runs[2] / CHECKPOINT).unlink()
    again: list[str] = []
    again_points = sweep(
        [cfg], out, kappas=[0.1, 0.2], objectives=["geco", "elbo"], eval_options=EVAL, log=again.append, jobs=1
    )
    done = [line.split(": ")[1].removesuffix(" and evaluated") for line in again]
    assert done == ["kept", "resumed", "trained"]
    assert (os.stat(runs[0] / CHECKPOINT).st_mtime_ns, os.stat(runs[0] / "eval.json").st_mtime_ns) == stamps[runs[0]]
    # resumed at its final step: nothing to train, the summary written again from the same checkpoint
    assert os.stat(runs[1] / CHECKPOINT).st_mtime_ns == stamps[runs[1]][0] and (runs[1] / "summary.json").is_file()
    assert again_points[:2] == points[:2]  # the same checkpoints give the same evaluation
    assert again_points[2] == points[2]  # and retraining from scratch is deterministic


def test_a_sweep_refuses_a_run_folder_made_with_another_config_and_leaves_it_alone(tmp_path):
    cfg, out = _config(tmp_path), tmp_path / "sweep"
    sweep([cfg], out, kappas=[0.1], eval_options=EVAL, log=lambda _: None, jobs=1)
    before = (out / "tiny" / "geco-k0.1" / CHECKPOINT).read_bytes()
    with pytest.raises(ConfigError, match="geco-k0.1 was trained with a different config"):
        sweep([cfg], out, kappas=[0.1], overrides=["train.lr=0.01"], eval_options=EVAL, log=lambda _: None, jobs=1)
    assert (out / "tiny" / "geco-k0.1" / CHECKPOINT).read_bytes() == before


def test_sweep_from_the_command_line_prints_the_table(tmp_path, geco_cli):
    out = geco_cli(
        "sweep", _config(tmp_path), "--kappa", "0.2", "--out", tmp_path / "s", "--examples", 32,
        "--marginal-examples", 8, "--set", "train.steps=4",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "| tiny | geco-k0.2 |" in out.stdout
    bad = geco_cli("sweep", _config(tmp_path), "--kappa", "0", "--out", tmp_path / "s2")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "kappa must be > 0" in bad.stderr
    assert not (tmp_path / "s2").exists()


def test_information_plane_joins_geco_points_per_group_and_marks_baselines(tmp_path):
    points = [
        {"group": g, "objective": "geco", "constrained": True, "kappa": k, "kl": 10 / k, "nll": 1 + k}
        for g in "ab"
        for k in (0.1, 0.2)
    ] + [
        {"group": "a", "objective": o, "constrained": False, "kappa": None, "kl": 200.0, "nll": 1.0}
        for o in ("elbo", "annealed-beta")
    ]
    path = plot_information_plane(points, tmp_path / "plane.png")
    assert min(_png_size(path)) > 300


def test_grids_put_several_runs_side_by_side(tmp_path):
    rows = [torch.rand(8, 1, 28, 28) for _ in range(3)]
    one = save_grids([("κ=0.1", rows)], tmp_path / "one.png")
    three = save_grids([(f"κ={k}", rows) for k in (0.1, 0.2, 0.3)], tmp_path / "three.png")
    assert _png_size(three)[1] > 2 * _png_size(one)[1]
    labelled = save_grids([("κ=0.1", rows)], tmp_path / "labelled.png", ["data", "reconstruction", "sample"])
    assert _png_size(labelled)[1] > _png_size(one)[1]  # room for the row labels


def test_plot_draws_the_curves_of_several_runs_and_rejects_a_folder_without_metrics(tmp_path, geco_cli):
    from test_training import config

    from geco_core.training import train

    a = train(config=config(), run_dir=tmp_path / "a")
    b = train(config=config(objective={"name": "elbo"}), run_dir=tmp_path / "b")
    out = geco_cli("plot", a, b, "--out", tmp_path / "curves.png")
    assert out.returncode == 0, out.stderr
    assert min(_png_size(tmp_path / "curves.png")) > 300
    (tmp_path / "empty").mkdir()
    bad = geco_cli("plot", a, tmp_path / "empty", "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "is not a run folder" in bad.stderr and "Traceback" not in bad.stderr
    (b / "metrics.jsonl").unlink()
    bad = geco_cli("plot", a, b, "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "has no metrics.jsonl" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.png").exists()


def _metrics_of(out, points) -> dict[str, list]:
    return {p["run"]: (out / "tiny" / p["run"] / "metrics.jsonl").read_text().splitlines() for p in points}


def test_a_sweep_in_parallel_gives_every_run_the_metrics_it_gets_alone(tmp_path):
    """Four runs, two at a time in processes of their own, against one after another (one
    thread each either way): the same metrics, line for line, and the same points."""
    cfg, sets = _config(tmp_path), ["train.threads=1"]
    kwargs = {"kappas": [0.1, 0.2, 0.3], "objectives": ["geco", "elbo"], "overrides": sets, "eval_options": EVAL}
    one = sweep([cfg], tmp_path / "one", log=lambda _: None, jobs=1, **kwargs)
    lines: list[str] = []
    two = sweep([cfg], tmp_path / "two", log=lines.append, jobs=2, **kwargs)
    assert len(one) == len(two) == 4 and sorted(lines) == sorted(set(lines))
    assert _metrics_of(tmp_path / "one", one) == _metrics_of(tmp_path / "two", two)
    assert one == two


def test_a_failed_run_is_reported_in_one_line_and_the_others_go_on(tmp_path, monkeypatch):
    import importlib

    from geco_core.errors import GecoError

    module = importlib.import_module("geco_core.evaluation.sweep")  # the package exports sweep() by that name

    real = module._ensure_trained

    def broken(run_dir, config):  # one run's own failure, as a bad option would be
        if run_dir.name == "geco-k0.2":
            raise ConfigError("objective.sigma must be > 0, got -1.0")
        return real(run_dir, config)

    monkeypatch.setattr(module, "_ensure_trained", broken)
    lines: list[str] = []
    with pytest.raises(GecoError, match=r"1 of 2 runs of the sweep failed: tiny/geco-k0.2: objective.sigma"):
        sweep([_config(tmp_path)], tmp_path / "s", kappas=[0.1, 0.2], log=lines.append, jobs=1, eval_options=EVAL)
    assert any("geco-k0.1: trained and evaluated" in line for line in lines)
    assert any("geco-k0.2: failed: objective.sigma must be > 0" in line for line in lines)
    assert [p["run"] for p in json.loads((tmp_path / "s" / "sweep.json").read_text())] == ["geco-k0.1"]


def test_a_sweep_runs_on_ray_with_the_same_metrics(tmp_path):
    """Ray's local cluster (the optional extra geco-core[ray]), two runs as Ray tasks: the same
    metrics as one after another in this process."""
    pytest.importorskip("ray")
    cfg, sets = _config(tmp_path), ["train.threads=1"]
    kwargs = {"kappas": [0.1, 0.2], "overrides": sets, "eval_options": EVAL}
    alone = sweep([cfg], tmp_path / "alone", log=lambda _: None, jobs=1, **kwargs)
    on_ray = sweep([cfg], tmp_path / "ray", log=lambda _: None, jobs=2, backend="ray", **kwargs)
    assert _metrics_of(tmp_path / "alone", alone) == _metrics_of(tmp_path / "ray", on_ray)


def test_an_interrupted_parallel_sweep_stops_its_workers_and_resumes(tmp_path):
    """Ctrl-C on `geco sweep --jobs 2` (the driver's SIGINT) ends it with code 130 and one line,
    its workers stop with it (no run goes on training), and the same sweep again resumes both
    runs from their checkpoints to the end."""
    import signal
    import subprocess
    import sys
    import time

    doc = {**TINY, "train": {**TINY["train"], "steps": 2000, "checkpoint_every": 20, "log_every": 20}}
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(doc))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "geco_core.cli", "sweep", str(path), "--kappa", "0.1", "0.2", "--jobs", "2"]
    cmd += ["--out", str(out), "--examples", "32", "--marginal-examples", "16"]
    metrics = [out / "tiny" / name / "metrics.jsonl" for name in ("geco-k0.1", "geco-k0.2")]
    # a shell's background job ignores Ctrl-C and its children inherit that: give the sweep the default
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not all(m.exists() and m.read_text().count("\n") >= 2 for m in metrics):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    sizes = [m.stat().st_size for m in metrics]
    time.sleep(1.0)
    assert [m.stat().st_size for m in metrics] == sizes  # nothing trains on
    assert not (out / "sweep.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("resumed and evaluated") == 2
    assert [json.loads(line)["step"] for line in metrics[0].read_text().splitlines()][-1] == 2000
