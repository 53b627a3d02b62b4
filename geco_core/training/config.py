"""Experiment configuration: a TOML file structured into attrs classes, one per section, by cattrs.

Sections: ``[data]``, ``[model]``, ``[objective]`` (with ``[objective.<name>]`` tables),
``[[constraints]]`` (an array of tables, stacked in order), ``[train]``, ``[logging]``. Keys that are
not fields of the data, model, objective and constraint sections are options of the registered
dataset, model, objective or constraint, checked against its constructor's signature. Every unknown
key, wrong type, non-finite number or out-of-range value fails with a one-line
:class:`ConfigError` that names it (``train.steps must be > 0, got -5``).
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
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.errors import IterableValidationNote as IndexNote
from cattrs.gen import make_dict_structure_fn

from geco_core.errors import ConfigError
from geco_core.plugins import CORE_VERSION, Entry, registry
from geco_core.training.overrides import apply_override
from geco_core.training.upgrade import upgrade_resolved, written_by

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "ConstraintConfig",
    "TrainConfig",
    "LoggingConfig",
    "load_config",
    "check_type",
    "INJECTED",
]

#: keyword arguments the trainer passes to registered factories itself, never from the config
INJECTED = {
    "dataset": {"root", "split", "seed", "download"},
    "model": {"image_shape", "context_shape", "data_mean"},
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
    process is running on when the run starts, at least 1). ``compile``: compile the step's loss
    whole (model, objective, GECO, constraints; ``torch.compile(fullgraph=True)``; the model alone
    under several processes); Adam's step is fused either way. ``validation``: examples held out of the
    training set (drawn by ``data.seed``, at most a tenth of it) on which every constraint is
    measured each ``validate_every`` steps; GECO tightens its targets by the generalisation gap it
    sees there (:meth:`GECO.validate`), so that held-out data meets kappa. 0: no validation."""

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
    validation: int = attrs.field(default=1000, validator=non_negative)
    validate_every: int = attrs.field(default=200, validator=positive)


@attrs.frozen
class LoggingConfig:
    """Where runs go (``dir/name-<time>``) and what they write; the first ``eval_examples`` held-out
    examples are evaluated for the final summary (10 000: all of MNIST's test set, whose first
    examples are not a random sample of it). ``mlflow``: track the run in MLflow as well (the extra
    ``geco-core[mlflow]``; ``$MLFLOW_TRACKING_URI``, else ``dir/mlflow.db``)."""

    dir: str = "runs"
    name: str | None = None
    tensorboard: bool = True
    progress: bool = True
    plots: bool = True
    mlflow: bool = False
    eval_examples: int = attrs.field(default=10_000, validator=non_negative)


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
        """Structure and check a TOML document (as a dict), including the registered names and options."""
        if not isinstance(data.get("constraints", []), list):
            raise ConfigError("constraints must be an array of tables: [[constraints]]")
        try:
            config = _converter.structure(data, cls)
        except (ClassValidationError, IterableValidationError) as exc:
            raise ConfigError(_first_error(exc, "")) from None
        return config._check_registered()

    def to_dict(self) -> dict[str, Any]:
        """The config as a TOML-ready dict: options back among their section's keys, no None values."""

        def table(obj: Any) -> dict[str, Any]:
            out = {k: v for k, v in attrs.asdict(obj, recurse=False).items() if v is not None and k != "options"}
            return {**out, **_plain(getattr(obj, "options", {}))}

        out = {f.name: table(getattr(self, f.name)) for f in attrs.fields(Config) if attrs.has(f.type)}
        objective = self.objective  # its options under [objective.<name>], like the other objectives'
        tables = {objective.name: objective.options, **objective.tables}
        out["objective"] = {"name": objective.name, **{name: _plain(t) for name, t in tables.items()}}
        out["constraints"] = [table(c) for c in self.constraints]
        return out

    def to_toml(self) -> str:
        """The resolved config as TOML (a run folder's ``config.toml``, ``geco train
        --print-config``): every default written out, the first line naming the geco that wrote it."""
        import tomli_w

        header = f"# geco {CORE_VERSION}: the resolved config, every default written out\n"
        return header + tomli_w.dumps(self.to_dict())

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


# --- structuring ---------------------------------------------------------------------------------


class _Invalid(TypeError):
    """A value of the wrong type; its message is ``must be <what>, got <value>``."""


def _strict(check: typing.Callable[[Any], bool], what: str, convert: typing.Callable[[Any], Any] = lambda v: v):
    def hook(value: Any, _: Any) -> Any:
        if not check(value):
            raise _Invalid(f"must be {what}, got {value!r}")
        return convert(value)

    return hook


def _union(value: Any, annotation: Any) -> Any:
    """The first member of the union that ``value`` structures to (TOML gives no type tags)."""
    for member in typing.get_args(annotation):
        try:
            return _converter.structure(value, member)
        except (_Invalid, ClassValidationError, IterableValidationError):
            continue
    raise _Invalid(f"must be {_describe(annotation)}, got {value!r}")


def _array(value: Any, annotation: Any) -> tuple:
    """A TOML array as a tuple (hashable, so configs compare), each item structured to its type."""
    args = typing.get_args(annotation)
    if not isinstance(value, list | tuple):
        raise _Invalid(f"must be {_describe(annotation)}, got {value!r}")
    if typing.get_origin(annotation) is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise _Invalid(f"must be {_describe(annotation)}, got {value!r}")
        items = zip(value, args)
    else:
        items = ((v, args[0] if args else Any) for v in value)
    out = []
    for i, (v, a) in enumerate(items):
        try:
            out.append(_converter.structure(v, a))
        except (_Invalid, ClassValidationError, IterableValidationError) as exc:
            if isinstance(exc, _Invalid) and not attrs.has(a):
                raise _Invalid(f"must be {_describe(annotation)}, got {value!r}") from None
            exc.add_note(IndexNote(f"index {i}", i, a))  # a table of an array: its error names it
            raise IterableValidationError(f"While structuring {annotation}", [exc], annotation) from None
    return tuple(out)


def _section(cls: type):
    """Structure a section (a table). Where it has ``options``, its keys beyond its fields are a
    registered factory's options (``[objective.<name>]`` tables of registered objectives go to
    ``tables``); elsewhere an unknown key is an error."""
    names = {f.name for f in attrs.fields(cls)} - {"options", "tables"}
    structure = make_dict_structure_fn(cls, _converter, _cattrs_forbid_extra_keys=True)

    def hook(table: Any, _: Any) -> Any:
        if not isinstance(table, dict):
            raise _Invalid(f"must be a table, got {table!r}")
        if "options" not in attrs.fields_dict(cls):
            return structure(table, cls)
        known = {k: v for k, v in table.items() if k in names}
        options = {k: v for k, v in table.items() if k not in names}
        if cls is ObjectiveConfig:
            objectives = registry().entries["objective"]
            known["tables"] = {k: v for k, v in options.items() if isinstance(v, dict) and k in objectives}
            options = {k: v for k, v in options.items() if k not in known["tables"]}
        return structure({**known, "options": options}, cls)

    return hook


_converter = cattrs.Converter(forbid_extra_keys=True)
for _type, _valid, _what in (
    (int, lambda v: type(v) is int, "an integer"),
    (float, lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number"),
    (bool, lambda v: type(v) is bool, "true or false"),
    (str, lambda v: isinstance(v, str), "a string"),
    (type(None), lambda v: v is None, "nothing"),
):
    _converter.register_structure_hook(_type, _strict(_valid, _what, float if _type is float else lambda v: v))
_converter.register_structure_hook_func(lambda t: t is Any or t is inspect.Parameter.empty, lambda v, _: v)
_converter.register_structure_hook_func(
    lambda t: t is dict or typing.get_origin(t) is dict, _strict(lambda v: isinstance(v, dict), "a table")
)
_converter.register_structure_hook_func(lambda t: typing.get_origin(t) in (typing.Union, types.UnionType), _union)
_converter.register_structure_hook_func(
    lambda t: t in (tuple, list) or typing.get_origin(t) in (tuple, list, Sequence, typing.Sequence), _array
)
for _cls in (DataConfig, ModelConfig, ConstraintConfig, ObjectiveConfig, TrainConfig, LoggingConfig):
    _converter.register_structure_hook(_cls, _section(_cls))


def _first_error(exc: BaseException, path: str) -> str:
    """The first error cattrs collected, as one line naming its key."""
    if isinstance(exc, ClassValidationError | IterableValidationError):
        for sub in exc.exceptions:
            notes = [n for n in getattr(sub, "__notes__", ()) if isinstance(n, AttributeValidationNote | IndexNote)]
            if isinstance(sub, KeyError):
                return f"[{path}] needs the key {sub.args[0]!r}"
            if not notes:
                return _first_error(sub, path)
            note = notes[0]
            where = f"{path}[{note.index}]" if isinstance(note, IndexNote) else f"{path}.{note.name}".lstrip(".")
            return _first_error(sub, where)
    if isinstance(exc, ForbiddenExtraKeysError):
        extra = sorted(exc.extra_fields)[0]
        accepted = ", ".join(f.name for f in attrs.fields(exc.cl) if f.name not in ("options", "tables"))
        if exc.cl is Config:
            return f"unknown section [{extra}] (sections: {accepted})"
        return f"unknown key {path}.{extra} ([{path}] accepts: {accepted})"
    if isinstance(exc, _Invalid) and not path:
        return str(exc)
    if isinstance(exc, _Invalid):
        return f"{path} {exc}" if "." in path or "[" in path else f"[{path}] {exc}"
    return f"{path}.{exc}" if path else str(exc)  # a validator's message starts with the field


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
    """``value`` structured to ``annotation`` (int, float, bool, str, unions, arrays, tables), as
    TOML gives it (an int for a float, an array for a tuple); else a ConfigError naming ``key``."""
    try:
        return _converter.structure(value, annotation)
    except (_Invalid, ClassValidationError, IterableValidationError):
        raise ConfigError(f"{key} must be {_describe(annotation)}, got {value!r}") from None
    except cattrs.StructureHandlerNotFoundError:
        return value  # an annotation we do not know how to check


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
    file is a run folder's resolved config, possibly written by an earlier geco (upgraded on reading,
    :mod:`~geco_core.training.upgrade`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
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
        data = upgrade_resolved(data, written_by(text))
    for override in overrides:
        apply_override(data, override)
    return Config.from_dict(data)
