"""Configs: every shipped config parses; a table of bad configs, each failing with one line that
names the offending key; overrides; the resolved config round-trips through TOML."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w
from helpers import REPO

from geco_core import ConfigError
from geco_core.config import Config, load_config

BASE = {
    "data": {"name": "shapes", "n": 256, "size": 16},
    "model": {"name": "mlp-vae", "latent_dim": 4},
    "objective": {"name": "geco"},
    "constraints": [{"name": "re", "kappa": 0.1}],
    "train": {"steps": 10},
}


def with_(path: str, value) -> dict:
    """BASE with one key set (``constraints.0.kappa``) or, with value ``...``, removed."""
    import copy

    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return doc


BAD = [
    # (key, value, the message must contain)
    ("trian", {"steps": 1}, "unknown section [trian]"),
    ("train.setps", 5, "unknown key train.setps ([train] accepts: steps, batch_size"),
    ("train.steps", -5, "train.steps must be > 0, got -5"),
    ("train.steps", "many", "train.steps must be an integer, got 'many'"),
    ("train.steps", 2.5, "train.steps must be an integer, got 2.5"),
    ("train.lr", "fast", "train.lr must be a number, got 'fast'"),
    ("train.device", "tpu", "train.device must be auto, cpu or cuda[:N], got 'tpu'"),
    ("train.precision", "float16", "train.precision must be one of float32, bfloat16"),
    ("objective.name", "vae", "objective.name must be one of elbo, beta, annealed-beta, geco"),
    ("objective.geco.alpha", 1.5, "objective.geco.alpha must be in [0, 1), got 1.5"),
    ("objective.geco.lr", 0, "objective.geco.lr must be > 0, got 0"),
    ("objective.geco.lamda_max", 10, "unknown key objective.geco.lamda_max"),
    ("objective.beta", -1, "objective.beta must be > 0"),
    ("logging.progress", "yes", "logging.progress must be true or false, got 'yes'"),
    ("data.name", "imagenet", "data.name: unknown dataset 'imagenet'; installed: "),
    ("data.sizee", 16, "unknown key data.sizee for dataset 'shapes' (accepts: n, size, channels, max_shapes)"),
    ("data.size", "big", "data.size must be an integer, got 'big'"),
    ("data.split", "test", "unknown key data.split for dataset 'shapes'"),
    ("model.name", "gan", "model.name: unknown model 'gan'; installed: conv-vae (geco-core)"),
    ("model.laten_dim", 4, "unknown key model.laten_dim for model 'mlp-vae' (accepts: latent_dim, hidden)"),
    ("model.hidden", [64, "x"], "model.hidden must be an array of integers, got [64, 'x']"),
    ("model.image_shape", [1, 2, 3], "unknown key model.image_shape"),
    ("constraints.0.name", "rx", "constraints[0].name: unknown constraint 'rx'; installed: re (geco-re)"),
    ("constraints.0.kapa", 0.1, "unknown key constraints[0].kapa for constraint 're' (accepts: kappa, per)"),
    ("constraints.0.kappa", "0.1", "constraints[0].kappa must be a number, got '0.1'"),
    ("constraints.0.lr", -2.0, "constraints[0].lr must be > 0, got -2.0"),
    ("constraints.0.name", ..., "[constraints[0]] needs the key 'name'"),
    ("constraints", {"name": "re"}, "constraints must be an array of tables: [[constraints]]"),
    ("constraints", [], "objective.name = 'geco' needs at least one [[constraints]] table"),
]


@pytest.mark.parametrize("key, value, message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_a_bad_config_fails_with_one_line_naming_the_key(key, value, message):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(with_(key, value))
    text = str(info.value)
    assert message in text and "\n" not in text


def test_invalid_toml_and_missing_files_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_overrides_set_nested_keys_and_list_entries(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(BASE))
    sets = ["train.steps=7", "constraints.0.kappa=0.05", "objective.geco.alpha=0.5", "model.hidden=[32, 16]"]
    cfg = load_config(path, [*sets, "logging.name=abc"])
    assert cfg.train.steps == 7 and cfg.objective.geco.alpha == 0.5 and cfg.logging.name == "abc"
    assert cfg.constraints[0].options == {"kappa": 0.05} and cfg.model.options["hidden"] == (32, 16)
    with pytest.raises(ConfigError, match="constraints has 1 entries, no '3'"):
        load_config(path, ["constraints.3.kappa=0.1"])
    with pytest.raises(ConfigError, match="--set expects section.key=value"):
        load_config(path, ["steps"])


def test_the_resolved_config_round_trips_through_toml():
    cfg = Config.from_dict(with_("objective.geco.lambda_max", 1e4))
    again = Config.from_dict(tomllib.loads(tomli_w.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.train.batch_size == 64  # defaults are written out


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path):
    assert isinstance(load_config(path), Config)
