"""Experiment configuration: a TOML file parsed into attrs classes, one per section.

Sections: ``[data]``, ``[model]``, ``[objective]`` (with ``[objective.geco]``), ``[[constraints]]``
(an array of tables, stacked in order), ``[train]``, ``[logging]``. Keys that are not fields of the
data, model and constraint sections are options of the registered dataset, model or constraint and
are checked against its signature. Every unknown key, wrong type or out-of-range value fails with a
one-line :class:`ConfigError` that names it (``train.steps must be > 0, got -5``).
"""

from __future__ import annotations

import inspect
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from geco_core.errors import ConfigError
from geco_core.objectives import OBJECTIVES
from geco_core.plugins import registry

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "GecoConfig",
    "ObjectiveConfig",
    "ConstraintConfig",
    "TrainConfig",
    "LoggingConfig",
    "load_config",
    "parse_override",
]


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
class GecoConfig:
    """The options of :class:`geco_core.GECO`; defaults are the paper's."""

    alpha: float = attrs.field(default=0.99, validator=_check(lambda v: 0 <= v < 1, "in [0, 1)"))
    lr: float = attrs.field(default=1.0, validator=positive)
    lambda_init: float = attrs.field(default=1.0, validator=positive)
    lambda_min: float | None = attrs.field(default=None, validator=positive)
    lambda_max: float | None = attrs.field(default=None, validator=positive)
    ma_init: float | None = None
    warmup: int = attrs.field(default=0, validator=non_negative)
    strict: bool = False


@attrs.frozen
class ObjectiveConfig:
    """``name``: elbo, beta, annealed-beta or geco; the likelihood serves the first three."""

    name: str = attrs.field(default="geco", validator=one_of(*OBJECTIVES))
    likelihood: str = attrs.field(default="gaussian", validator=one_of("gaussian", "bernoulli"))
    sigma: float = attrs.field(default=0.1, validator=positive)
    learn_sigma: bool = True
    beta: float = attrs.field(default=1.0, validator=positive)
    beta_start: float = attrs.field(default=2.0, validator=positive)
    beta_end: float = attrs.field(default=0.7, validator=positive)
    anneal_steps: int = attrs.field(default=10_000, validator=positive)
    geco: GecoConfig = attrs.field(factory=GecoConfig)


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
    """Optimisation: Adam with learning rate ``lr``; ``device`` auto picks CUDA when present."""

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
                    out.update(v)
                elif attrs.has(type(v)):
                    out[f.name] = table(v)
                elif v is not None:
                    out[f.name] = list(v) if isinstance(v, tuple) else v
            return out

        out = {f.name: table(getattr(self, f.name)) for f in attrs.fields(Config) if f.name != "constraints"}
        out["constraints"] = [table(c) for c in self.constraints]
        return out

    def _check_registered(self) -> Config:
        if self.objective.name == "geco" and not self.constraints:
            raise ConfigError("objective.name = 'geco' needs at least one [[constraints]] table")
        data = attrs.evolve(
            self.data,
            options=_options(
                "data", "dataset", self.data.name, self.data.options, {"root", "split", "seed", "download"}
            ),
        )
        model = attrs.evolve(
            self.model,
            options=_options("model", "model", self.model.name, self.model.options, {"image_shape", "context_shape"}),
        )
        constraints = tuple(
            attrs.evolve(c, options=_options(f"constraints[{i}]", "constraint", c.name, c.options, {"image_shape"}))
            for i, c in enumerate(self.constraints)
        )
        return attrs.evolve(self, data=data, model=model, constraints=constraints)


# Sections whose extra keys are options of a registered factory.
_WITH_OPTIONS = (DataConfig, ModelConfig, ConstraintConfig)


def _section(cls: type, prefix: str, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{prefix}] must be a table, got {table!r}")
    fields = attrs.fields_dict(cls)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in table.items():
        if key in fields and key != "options":
            if attrs.has(hints[key]):
                kwargs[key] = _section(hints[key], f"{prefix}.{key}", value)
            else:
                kwargs[key] = check_type(f"{prefix}.{key}", value, hints[key])
        elif cls in _WITH_OPTIONS:
            options[key] = value
        else:
            accepted = ", ".join(k for k in fields if k != "options")
            raise ConfigError(f"unknown key {prefix}.{key} ([{prefix}] accepts: {accepted})")
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


def _options(prefix: str, kind: str, name: str, options: dict[str, Any], injected: set[str]) -> dict[str, Any]:
    """Check a section's extra keys against the registered factory's keyword arguments and types."""
    try:
        entry = registry().get(kind, name)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.name: {exc}") from None
    params = inspect.signature(entry.factory).parameters
    accepted = [
        p
        for p in params
        if p not in injected and params[p].kind in (params[p].KEYWORD_ONLY, params[p].POSITIONAL_OR_KEYWORD)
    ]
    try:
        hints = typing.get_type_hints(entry.factory.__init__ if inspect.isclass(entry.factory) else entry.factory)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check names only
        hints = {}
    checked = {}
    for key, value in options.items():
        if key in injected or not entry.accepts(key):
            known = ", ".join(accepted) or "nothing"
            raise ConfigError(f"unknown key {prefix}.{key} for {kind} {name!r} (accepts: {known})")
        checked[key] = check_type(f"{prefix}.{key}", value, hints[key]) if key in hints else value
    return checked


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
        return isinstance(value, int | float) and not isinstance(value, bool), float(value) if isinstance(
            value, int | float
        ) else value
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
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table"}
    if annotation in names:
        return names[annotation]
    if origin in (tuple, list, Sequence):
        inner = _describe(args[0]) if args else "values"
        return f"an array of {inner.removeprefix('an ').removeprefix('a ')}s" if args else "an array"
    return str(annotation)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML config, apply ``section.key=value`` overrides, and check it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for override in overrides:
        apply_override(data, override)
    return Config.from_dict(data)


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
