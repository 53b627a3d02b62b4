"""Experiment configuration: a TOML file parsed into attrs classes, one per section.

Sections: ``[data]``, ``[model]``, ``[objective]`` (with ``[objective.<name>]`` tables),
``[[constraints]]`` (an array of tables, stacked in order), ``[train]``, ``[logging]``. Keys that are
not fields of the data, model, objective and constraint sections are options of the registered
dataset, model, objective or constraint and are checked against its signature. Every unknown key,
wrong type, non-finite number or out-of-range value fails with a one-line :class:`ConfigError` that
names it (``train.steps must be > 0, got -5``).
"""

from __future__ import annotations

import inspect
import math
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from geco_core.errors import ConfigError
from geco_core.plugins import Entry, registry

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "ConstraintConfig",
    "TrainConfig",
    "LoggingConfig",
    "load_config",
    "parse_override",
    "upgrade_resolved",
    "check_type",
    "INJECTED",
]

#: keyword arguments the trainer passes to registered factories itself, never from the config
INJECTED = {
    "dataset": {"root", "split", "seed", "download"},
    "model": {"image_shape", "context_shape"},
    "constraint": {"image_shape"},
    "objective": {"constraints"},
}


def _check(predicate: typing.Callable[[Any], bool], text: str):
    def validator(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not predicate(value):
            raise ConfigError(f"{attribute.name} must be {text}, got {value!r}")

    return validator


positive = _check(lambda v: v > 0, "> 0")
non_negative = _check(lambda v: v >= 0, ">= 0")


def one_of(*choices: str):
    return _check(lambda v: v in choices, "one of " + ", ".join(choices))


@attrs.frozen
class DataConfig:
    """``name``: a registered dataset; ``root``: data folder (else $GECO_DATA, else the user cache);
    ``seed``: for derived and generated sets; ``download``: fetch missing files where possible."""

    name: str = "shapes"
    root: str | None = None
    seed: int = 0
    download: bool = True
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ModelConfig:
    """``name``: a registered model; other keys are its options (``latent_dim``, ...)."""

    name: str = "conv-vae"
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ObjectiveConfig:
    """``name``: a registered objective (``geco objectives``); ``options``: its keyword arguments,
    from ``[objective]`` itself or its ``[objective.<name>]`` table, checked against its constructor
    and written out with every default. ``tables`` keeps the tables of other objectives (checked
    too), so that one config can be swept over objectives."""

    name: str = "geco"
    options: dict[str, Any] = attrs.field(factory=dict)
    tables: dict[str, dict[str, Any]] = attrs.field(factory=dict)


@attrs.frozen
class ConstraintConfig:
    """One stacked constraint: ``name`` (registered), optional per-constraint GECO ``lr`` and
    ``lambda_init``; other keys are the constraint's options (``kappa``, ...)."""

    name: str
    lr: float | None = attrs.field(default=None, validator=positive)
    lambda_init: float | None = attrs.field(default=None, validator=positive)
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class TrainConfig:
    """Optimisation: Adam (fused) with learning rate ``lr``; ``device`` auto picks CUDA when present.
    ``max_nonfinite_steps`` steps in a row with a non-finite loss or gradient (each skipped) stop
    the run as diverged. ``threads``: CPU threads of torch (default: one per core that no other
    process is running on when the run starts, at least 1). ``compile``: run the model through
    ``torch.compile`` (GECO's update stays outside)."""

    steps: int = attrs.field(default=1000, validator=positive)
    batch_size: int = attrs.field(default=64, validator=positive)
    lr: float = attrs.field(default=1e-3, validator=positive)
    seed: int = 0
    device: str = attrs.field(
        default="auto",
        validator=_check(lambda v: v in ("auto", "cpu") or v.startswith("cuda"), "auto, cpu or cuda[:N]"),
    )
    precision: str = attrs.field(default="float32", validator=one_of("float32", "bfloat16"))
    grad_clip: float | None = attrs.field(default=None, validator=positive)
    checkpoint_every: int = attrs.field(default=500, validator=positive)
    log_every: int = attrs.field(default=10, validator=positive)
    max_nonfinite_steps: int = attrs.field(default=10, validator=positive)
    threads: int | None = attrs.field(default=None, validator=positive)
    compile: bool = False


@attrs.frozen
class LoggingConfig:
    """Where runs go (``dir/name-<time>``) and what they write; ``eval_examples`` held-out examples
    are evaluated for the final summary."""

    dir: str = "runs"
    name: str | None = None
    tensorboard: bool = True
    progress: bool = True
    plots: bool = True
    eval_examples: int = attrs.field(default=2000, validator=non_negative)


@attrs.frozen
class Config:
    data: DataConfig = attrs.field(factory=DataConfig)
    model: ModelConfig = attrs.field(factory=ModelConfig)
    objective: ObjectiveConfig = attrs.field(factory=ObjectiveConfig)
    constraints: tuple[ConstraintConfig, ...] = ()
    train: TrainConfig = attrs.field(factory=TrainConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Parse and check a TOML document (as a dict), including the registered names and options."""
        sections = typing.get_type_hints(cls)
        for key in data:
            if key not in sections:
                raise ConfigError(f"unknown section [{key}] (sections: {', '.join(sections)})")
        tables = data.get("constraints", [])
        if not isinstance(tables, list):
            raise ConfigError("constraints must be an array of tables: [[constraints]]")
        config = cls(
            **{k: _section(sections[k], k, data[k]) for k in data if k != "constraints"},
            constraints=tuple(_section(ConstraintConfig, f"constraints[{i}]", t) for i, t in enumerate(tables)),
        )
        return config._check_registered()

    def to_dict(self) -> dict[str, Any]:
        """The config as a TOML-ready dict: options back among their section's keys, no None values."""

        def table(obj: Any) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for f in attrs.fields(type(obj)):
                v = getattr(obj, f.name)
                if f.name == "options":
                    out.update(_plain(v))
                elif attrs.has(type(v)):
                    out[f.name] = table(v)
                elif v is not None:
                    out[f.name] = list(v) if isinstance(v, tuple) else v
            return out

        sections = [f.name for f in attrs.fields(Config) if f.name not in ("objective", "constraints")]
        out = {name: table(getattr(self, name)) for name in sections}
        objective = self.objective  # its options under [objective.<name>], like the other objectives'
        tables = {objective.name: objective.options, **objective.tables}
        out["objective"] = {"name": objective.name, **{name: _plain(t) for name, t in tables.items()}}
        out["constraints"] = [table(c) for c in self.constraints]
        return out

    def _check_registered(self) -> Config:
        constrained = getattr(_entry("objective", "objective", self.objective.name).factory, "constrained", False)
        if constrained and not self.constraints:
            raise ConfigError(f"objective.name = {self.objective.name!r} needs at least one [[constraints]] table")
        data = attrs.evolve(self.data, options=_options("data", "dataset", self.data.name, self.data.options))
        model = attrs.evolve(self.model, options=_options("model", "model", self.model.name, self.model.options))
        chosen = self.objective.name
        tables = {
            name: _options(f"objective.{name}", "objective", name, t) for name, t in self.objective.tables.items()
        }
        given = _options("objective", "objective", chosen, self.objective.options)
        for key in given.keys() & tables.get(chosen, {}).keys():
            raise ConfigError(f"objective.{key} is given twice: in [objective] and in [objective.{chosen}]")
        options = _options("objective", "objective", chosen, {**tables.pop(chosen, {}), **given}, defaults=True)
        objective = ObjectiveConfig(chosen, options, tables)
        constraints = tuple(
            attrs.evolve(c, options=_options(f"constraints[{i}]", "constraint", c.name, c.options))
            for i, c in enumerate(self.constraints)
        )
        return attrs.evolve(self, data=data, model=model, objective=objective, constraints=constraints)


# Sections whose extra keys are options of a registered factory.
_WITH_OPTIONS = (DataConfig, ModelConfig, ConstraintConfig, ObjectiveConfig)


def _section(cls: type, prefix: str, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{prefix}] must be a table, got {table!r}")
    fields = attrs.fields_dict(cls)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, value in table.items():
        if key in fields and key not in ("options", "tables"):
            if attrs.has(hints[key]):
                kwargs[key] = _section(hints[key], f"{prefix}.{key}", value)
            else:
                kwargs[key] = check_type(f"{prefix}.{key}", value, hints[key])
        elif cls is ObjectiveConfig and isinstance(value, dict) and key in registry().entries["objective"]:
            tables[key] = value  # [objective.<name>]: the options of that objective
        elif cls in _WITH_OPTIONS:
            options[key] = value
        else:
            accepted = ", ".join(k for k in fields if k != "options")
            raise ConfigError(f"unknown key {prefix}.{key} ([{prefix}] accepts: {accepted})")
    if cls is ObjectiveConfig:
        kwargs["tables"] = tables
    if cls in _WITH_OPTIONS:
        kwargs["options"] = options
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.{exc}") from None
    except TypeError as exc:  # a required key is missing
        missing = [k for k, f in fields.items() if f.default is attrs.NOTHING and k not in kwargs]
        if missing:
            raise ConfigError(f"[{prefix}] needs the key {missing[0]!r}") from None
        raise ConfigError(f"[{prefix}]: {exc}") from None


def _entry(prefix: str, kind: str, name: str) -> Entry:
    try:
        return registry().get(kind, name)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.name: {exc}") from None


def _options(prefix: str, kind: str, name: str, options: dict[str, Any], defaults: bool = False) -> dict[str, Any]:
    """Check a section's extra keys against the registered factory's keyword arguments and types;
    with ``defaults``, add every option not given with its default."""
    entry = _entry(prefix, kind, name)
    injected = INJECTED[kind]
    params = {k: p for k, p in entry.parameters().items() if k not in injected}
    try:
        hints = typing.get_type_hints(entry.factory.__init__ if inspect.isclass(entry.factory) else entry.factory)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check names only
        hints = {}
    checked = {}
    for key, value in options.items():
        if key in injected or not entry.accepts(key):
            known = ", ".join(params) or "nothing"
            raise ConfigError(f"unknown key {prefix}.{key} for {kind} {name!r} (accepts: {known})")
        checked[key] = check_type(f"{prefix}.{key}", value, hints[key]) if key in hints else value
    if defaults:
        for key, p in params.items():
            if key not in checked and p.default is not p.empty and p.default is not None:
                checked[key] = p.default
    return checked


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Options as TOML can write them: tuples as lists, None left out."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items() if v is not None}


def check_type(key: str, value: Any, annotation: Any) -> Any:
    """``value`` if it fits ``annotation`` (int, float, bool, str, X | None, Sequence[X], tuple[...],
    dict), converted where TOML differs (int -> float, array -> tuple); else a ConfigError naming ``key``."""
    ok, converted = _fits(value, annotation)
    if not ok:
        raise ConfigError(f"{key} must be {_describe(annotation)}, got {value!r}")
    return converted


def _fits(value: Any, annotation: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _fits(value, arg)
            if ok:
                return True, converted
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value), float(value) if number else value
    if annotation is str:
        return isinstance(value, str), value
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        if not isinstance(value, list | tuple):
            return False, value
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False, value
            items = list(zip(value, args))
        else:
            items = [(v, args[0] if args else Any) for v in value]
        converted = []
        for v, a in items:
            ok, c = _fits(v, a)
            if not ok:
                return False, value
            converted.append(c)
        return True, tuple(converted)
    return True, value  # an annotation we do not know how to check


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a table"}
    if annotation in names:
        return names[annotation]
    if origin in (tuple, list, Sequence):
        inner = _describe(args[0]) if args else "values"
        return f"an array of {inner.removeprefix('an ').removeprefix('a ')}s" if args else "an array"
    return str(annotation)


def load_config(path: str | Path, overrides: Sequence[str] = (), resolved: bool = False) -> Config:
    """Read a TOML config, apply ``section.key=value`` overrides, and check it. ``resolved``: the
    file is a run folder's resolved config, possibly written by geco 0.1.0 (upgraded on reading)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config {path} is a folder, not a TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a text (UTF-8 TOML) file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if resolved:
        data = upgrade_resolved(data)
    for override in overrides:
        apply_override(data, override)
    return Config.from_dict(data)


#: options that geco 0.1.0 wrote into [objective] for every objective, and which objectives take them
_LEGACY_OPTIONS = {
    "likelihood": ("elbo", "beta", "annealed-beta"),
    "sigma": ("elbo", "beta", "annealed-beta"),
    "learn_sigma": ("elbo", "beta", "annealed-beta"),
    "beta": ("beta",),
    "beta_start": ("annealed-beta",),
    "beta_end": ("annealed-beta",),
    "anneal_steps": ("annealed-beta",),
}


def upgrade_resolved(data: dict[str, Any]) -> dict[str, Any]:
    """A run folder's config as this version writes it. geco 0.1.0 wrote every objective's options
    into one ``[objective]`` table and had no multiplier controllers: its options go to the tables
    of the objectives that take them, and its GECO runs keep Algorithm 1 (``controller = "paper"``)
    and the paper's CLA (``form = "probability"``), as they were trained."""
    objective = data.get("objective")
    if not isinstance(objective, dict):
        return data
    # a legacy option is a plain value; ``beta`` as a table is ``[objective.beta]`` of this version
    keys = {key for key in _LEGACY_OPTIONS.keys() & objective.keys() if not isinstance(objective[key], dict)}
    if not keys:
        return data
    legacy = {key: objective.pop(key) for key in keys}
    for key, value in legacy.items():
        for name in _LEGACY_OPTIONS[key]:
            objective.setdefault(name, {}).setdefault(key, value)
    objective.setdefault("geco", {}).setdefault("controller", "paper")
    for constraint in data.get("constraints", []):
        if constraint.get("name") == "cla":
            constraint.setdefault("form", "probability")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=200"`` -> (["train", "steps"], 200); the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or "." not in key:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], text: str) -> None:
    """Set one ``section.key=value`` (``constraints.0.kappa=0.05`` for the first constraint) in ``data``."""
    path, value = parse_override(text)
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {text}: {'.'.join(path[:i])} has {len(node)} entries, no {part!r}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"--set {text}: {'.'.join(path[: i + 1])} is not a section")
    if isinstance(node, list):
        raise ConfigError(f"--set {text}: choose an entry, e.g. {'.'.join(path[:-1])}.0.{path[-1]}")
    node[path[-1]] = value
