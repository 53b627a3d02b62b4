"""Plugin discovery: the ``geco`` entry points, loaded once and lazily through pluggy.

Every constraint, model and dataset, built in or from a plugin, is registered the same way and
found by name. A plugin that fails to import or to register is recorded by name in
``registry().failures`` (and warned about) without taking the others down.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import attrs
import pluggy

from geco_core import hookspecs
from geco_core.errors import ConfigError

__all__ = [
    "Entry",
    "PluginFailure",
    "Registry",
    "registry",
    "create",
    "create_constraint",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "geco"
HOOKS = {
    "constraint": "geco_register_constraints",
    "model": "geco_register_models",
    "dataset": "geco_register_datasets",
}
# Modules of geco_core itself that register through the same hooks as any plugin.
BUILTIN_PLUGINS: tuple[str, ...] = ("geco_core.models", "geco_core.data")
CORE_DISTRIBUTION = "geco-core"


@attrs.frozen
class Entry:
    """One registered thing: what it is, what makes it, and where it came from."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str
    version: str
    description: str

    def accepts(self, argument: str) -> bool:
        """Whether the factory takes a keyword ``argument`` (or ``**kwargs``)."""
        params = inspect.signature(self.factory).parameters.values()
        return any(p.name == argument or p.kind is p.VAR_KEYWORD for p in params)


@attrs.frozen
class PluginFailure:
    """A plugin that could not be loaded or could not register, and why."""

    plugin: str
    distribution: str
    error: str


@attrs.define
class Registry:
    """Everything the installed plugins registered, by kind and name."""

    entries: dict[str, dict[str, Entry]] = attrs.field(factory=lambda: {k: {} for k in HOOKS})
    failures: list[PluginFailure] = attrs.field(factory=list)

    def get(self, kind: str, name: str) -> Entry:
        """The entry called ``name``; a ConfigError listing what is installed if there is none."""
        found = self.entries[kind]
        if name in found:
            return found[name]
        if not found:
            raise ConfigError(f"unknown {kind} {name!r}: no {kind}s are installed")
        installed = ", ".join(f"{e.name} ({e.distribution})" for e in found.values())
        raise ConfigError(f"unknown {kind} {name!r}; installed: {installed}")

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])


@functools.cache
def registry() -> Registry:
    """Load the built-in modules and every ``geco`` entry point once, then ask each for its
    registrations. ``registry.cache_clear()`` forgets them (tests install plugins on the fly)."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    reg = Registry()
    for module in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module), name=module)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name):
            continue
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the others down
            reg.failures.append(PluginFailure(ep.name, _dist_name(ep.dist), _describe(exc)))
    origin = {id(plugin): (dist.project_name, dist.version) for plugin, dist in pm.list_plugin_distinfo()}
    for kind, hook in HOOKS.items():
        # pluggy lists implementations last-registered first; register in load order instead
        for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):
            dist, version = origin.get(id(impl.plugin), (CORE_DISTRIBUTION, _version(CORE_DISTRIBUTION)))
            register = functools.partial(_register, reg, kind, impl.plugin_name, dist, version)
            try:
                impl.function(register=register)
            except Exception as exc:  # noqa: BLE001
                reg.failures.append(PluginFailure(impl.plugin_name, dist, _describe(exc)))
    for f in reg.failures:
        warnings.warn(f"geco plugin {f.plugin!r} ({f.distribution}) failed: {f.error}", stacklevel=2)
    return reg


def _register(
    reg: Registry,
    kind: str,
    plugin: str,
    distribution: str,
    version: str,
    factory: Callable[..., Any],
    name: str | None = None,
    description: str | None = None,
) -> None:
    name = name or getattr(factory, "name", None)
    if not name:
        raise ValueError(f"{factory!r} has no name: pass register(..., name=...)")
    if name in reg.entries[kind]:
        first = reg.entries[kind][name]
        reg.failures.append(
            PluginFailure(plugin, distribution, f"{kind} {name!r} is already registered by {first.distribution}")
        )
        return
    doc = description or inspect.getdoc(factory) or ""
    summary = " ".join(doc.strip().split("\n\n")[0].split())  # first paragraph, on one line
    reg.entries[kind][name] = Entry(kind, name, factory, plugin, distribution, version, summary)


def create(kind: str, name: str, /, **kwargs: Any) -> Any:
    """Build the registered ``kind`` called ``name`` from keyword arguments; a wrong name or
    argument fails with a ConfigError that says what is accepted."""
    entry = registry().get(kind, name)
    params = inspect.signature(entry.factory).parameters
    accepted = ", ".join(
        p.name for p in params.values() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    )
    unknown = [k for k in kwargs if not entry.accepts(k)]
    if unknown:
        raise ConfigError(f"{kind} {name!r}: unknown argument {unknown[0]!r} (accepts: {accepted or 'nothing'})")
    try:
        inspect.signature(entry.factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{kind} {name!r}: {exc} (accepts: {accepted})") from None
    return entry.factory(**kwargs)


def create_constraint(name: str, /, **kwargs: Any) -> Any:
    """``create("constraint", name, **kwargs)``: e.g. ``create_constraint("re", kappa=0.1)``."""
    return create("constraint", name, **kwargs)


def _dist_name(dist: importlib.metadata.Distribution | None) -> str:
    return dist.metadata["Name"] if dist is not None else "?"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
