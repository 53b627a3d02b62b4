"""Configs: every shipped config parses; a table of bad configs, each failing with one line that
names the offending key; overrides; the resolved config round-trips through TOML."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import tomli_w
from helpers import REPO, needs_plugins

from geco_core import ConfigError
from geco_core.training.config import Config, load_config

BASE = {
    "data": {"name": "shapes", "n": 256, "size": 16},
    "model": {"name": "mlp-vae", "latent_dim": 4},
    "objective": {"name": "geco"},
    "constraints": [{"name": "test-mae", "kappa": 0.1}],
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
    ("train.lr", "fast", "train.lr must be a finite number, got 'fast'"),
    ("train.lr", math.inf, "train.lr must be a finite number, got inf"),
    ("train.lr", math.nan, "train.lr must be a finite number, got nan"),
    ("train.grad_clip", -math.inf, "train.grad_clip must be a finite number, got -inf"),
    ("train.device", "tpu", "train.device must be auto, cpu or cuda[:N], got 'tpu'"),
    ("train.precision", "float16", "train.precision must be one of float32, bfloat16"),
    ("train.max_nonfinite_steps", 0, "train.max_nonfinite_steps must be > 0, got 0"),
    ("objective.name", "vae", "objective.name: unknown objective 'vae'; installed: elbo (geco-core)"),
    ("objective.geco.alpha", "high", "objective.geco.alpha must be a finite number, got 'high'"),
    ("objective.geco.lambda_max", math.inf, "objective.geco.lambda_max must be a finite number, got inf"),
    ("objective.geco.lamda_max", 10, "unknown key objective.geco.lamda_max for objective 'geco' (accepts: alpha,"),
    ("objective.beta", 0.5, "unknown key objective.beta for objective 'geco'"),
    ("objective", {"name": "geco", "alpha": 0.5, "geco": {"alpha": 0.9}}, "objective.alpha is given twice"),
    ("objective", {"name": "geco", "elbo": {"sigmaa": 1}}, "unknown key objective.elbo.sigmaa for objective 'elbo'"),
    ("logging.progress", "yes", "logging.progress must be true or false, got 'yes'"),
    ("data.name", "imagenet", "data.name: unknown dataset 'imagenet'; installed: "),
    ("data.sizee", 16, "unknown key data.sizee for dataset 'shapes' (accepts: n, size, channels, max_shapes)"),
    ("data.size", "big", "data.size must be an integer, got 'big'"),
    ("data.split", "test", "unknown key data.split for dataset 'shapes'"),
    ("model.name", "gan", "model.name: unknown model 'gan'; installed: conv-vae (geco-core)"),
    (
        "model.laten_dim",
        4,
        "unknown key model.laten_dim for model 'mlp-vae' (accepts: latent_dim, hidden, output_start)",
    ),
    ("model.hidden", [64, "x"], "model.hidden must be an array of integers, got [64, 'x']"),
    ("model.image_shape", [1, 2, 3], "unknown key model.image_shape"),
    ("constraints.0.name", "rx", "constraints[0].name: unknown constraint 'rx'; installed: test-mae ($GECO_PLUGINS)"),
    ("constraints.0.kapa", 0.1, "unknown key constraints[0].kapa for constraint 'test-mae' (accepts: kappa)"),
    ("constraints.0.kappa", "0.1", "constraints[0].kappa must be a finite number, got '0.1'"),
    ("constraints.0.kappa", math.inf, "constraints[0].kappa must be a finite number, got inf"),
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
    assert cfg.train.steps == 7 and cfg.objective.options["alpha"] == 0.5 and cfg.logging.name == "abc"
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


@needs_plugins
@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_to_what_it_says_and_round_trips(path: Path):
    raw = tomllib.loads(path.read_text())
    cfg = load_config(path)
    assert cfg.objective.name == raw["objective"]["name"] and cfg.model.name == raw["model"]["name"]
    assert [c.name for c in cfg.constraints] == [c["name"] for c in raw.get("constraints", [])]
    assert [c.options.get("kappa") for c in cfg.constraints] == [c.get("kappa") for c in raw.get("constraints", [])]
    assert Config.from_dict(tomllib.loads(tomli_w.dumps(cfg.to_dict()))) == cfg


BAD_WHEN_BUILT = [
    # ranges are checked by the constructors, when the experiment is built: before anything is written
    ("objective.geco.alpha", 1.5, "alpha must be in [0, 1), got 1.5"),
    ("objective.geco.lr", 0.0, "lr"),
    ("objective.geco.controller", "pid", "unknown controller 'pid'; installed: "),
    ("objective.geco.controller", {"name": "nupi", "kp": -1.0}, "nupi needs kp >= 0"),
    ("objective.geco.controller", {"kp": 1.0}, "controller needs a name"),
    ("objective", {"name": "beta", "beta": -1.0}, "objective.beta must be > 0"),
    ("constraints.0.kappa", -0.1, "kappa must be a pixel MAE > 0"),
]


@pytest.mark.parametrize("key, value, message", BAD_WHEN_BUILT, ids=[f"{k}={v!r}" for k, v, _ in BAD_WHEN_BUILT])
def test_an_out_of_range_option_fails_when_built_with_one_line(key, value, message):
    from geco_core.training import build

    config = Config.from_dict(with_(key, value))
    with pytest.raises(ConfigError) as info:
        build(config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_each_objective_takes_its_own_table_and_keeps_the_others_for_a_sweep():
    doc = with_("objective", {"name": "elbo", "elbo": {"sigma": 0.2}, "geco": {"alpha": 0.5}})
    cfg = Config.from_dict(doc)
    assert cfg.objective.options == {"likelihood": "gaussian", "sigma": 0.2, "learn_sigma": True}
    assert cfg.objective.tables == {"geco": {"alpha": 0.5}}
    swept = Config.from_dict({**doc, "objective": {**doc["objective"], "name": "geco"}})
    assert swept.objective.options["alpha"] == 0.5 and swept.objective.options["controller"]
    assert Config.from_dict(tomllib.loads(tomli_w.dumps(cfg.to_dict()))) == cfg


def test_a_controller_given_as_a_table_round_trips_as_an_option_of_geco():
    controller = {"name": "nupi", "kp": 2.0}
    cfg = Config.from_dict(with_("objective.geco.controller", controller))
    assert cfg.objective.options["controller"] == controller and cfg.objective.tables == {}
    text = tomli_w.dumps(cfg.to_dict())
    assert Config.from_dict(tomllib.loads(text)) == cfg
