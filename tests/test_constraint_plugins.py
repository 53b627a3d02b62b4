"""The four constraint distributions together: all discovered through their entry points, each
usable alone from a config, and RE + CLA stacked on real MNIST ending with both satisfied."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
from helpers import REPO, needs_plugins, records
from test_data import needs_mnist

from geco_core.training import train
from geco_core.training.config import load_config

PLUGINS = {"re": "geco-re", "fre": "geco-fre", "cla": "geco-cla", "pncc": "geco-pncc"}
pytestmark = needs_plugins


def test_geco_constraints_lists_all_four_with_their_distributions(geco_cli):
    out = geco_cli("constraints")
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in out.stdout.splitlines()[1:]}
    for name, dist in PLUGINS.items():
        assert rows[name] == [dist, importlib.metadata.version(dist)]


@needs_mnist
@pytest.mark.parametrize("config", ["mnist-geco-fre.toml", "mnist-geco-pncc.toml"])
def test_each_constraint_config_trains_and_moves_its_constraint_towards_kappa(tmp_path, config):
    sets = [
        "model.name='mlp-vae'",
        "model.hidden=[128]",
        "train.steps=60",
        "train.log_every=5",
        "logging.progress=false",
        "logging.plots=false",
        "logging.eval_examples=64",
    ]
    run = train(config=load_config(REPO / "configs" / config, sets), run_dir=tmp_path / "run")
    first, last = records(run)[0], records(run)[-1]
    for c in json.loads((run / "summary.json").read_text())["constraints"]:
        name = c["component"]
        assert last[f"{name}/c_ma"] < first[f"{name}/c_ma"], name  # the violation shrinks


@needs_mnist
def test_re_and_cla_stacked_on_mnist_end_with_both_satisfied(tmp_path):
    sets = [
        "model.name='mlp-vae'",
        "model.hidden=[256]",
        "model.latent_dim=16",
        "train.lr=2e-3",
        "train.steps=800",
        "train.threads=1",  # the same arithmetic however busy the machine is (free cores set it otherwise)
        "constraints.0.kappa=0.25",
        "constraints.1.kappa=0.4",  # what an 800-step MLP reaches on held-out digits (L2-robust network)
        "constraints.1.lr=2.0",  # CLA's lambda stepping twice as fast, as configs/mnist-geco-cla.toml
        "logging.progress=false",
        "logging.plots=false",
        "logging.tensorboard=false",
    ]
    run = train(config=load_config(REPO / "configs" / "mnist-geco-re-cla.toml", sets), run_dir=tmp_path / "run")
    rows = {c["component"]: c for c in json.loads((run / "summary.json").read_text())["constraints"]}
    assert set(rows) == {"re", "cla"}
    # an active constraint is held at its bound (its c_ma hovers around 0): met, or within 2%
    assert {rows["re"]["status"], rows["cla"]["status"]} <= {"met", "at bound"}
    assert rows["re"]["reached"] <= 0.25 * 1.02 and rows["cla"]["reached"] >= 0.4 * 0.98
    # held-out digits, with the generalisation gap of a short run
    assert rows["re"]["heldout_reached"] <= 0.25 * 1.1 and rows["cla"]["heldout_reached"] >= 0.4 * 0.9
