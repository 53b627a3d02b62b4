"""Plugin discovery: the ``geco`` entry points, loaded once and on first use, through pluggy.

Everything is registered the same way and found by name. geco-core's own controllers, models,
datasets and objectives are plugin modules registered directly (:data:`DEFAULT_PLUGINS`, as llm
does), so a source tree that is not installed has them too; a third party's constraint is an entry
point of its own distribution. A plugin that fails to import, declares a hook that does not exist
(a misspelling), or fails while registering is recorded by name in ``registry().failures``
without taking the others down.

Loading a plugin imports only its module: plugins defer heavy imports (torchvision, timm) to the
moment something that needs them is built.

Modules named in ``$GECO_PLUGINS`` (comma-separated) load as plugins too, without being installed:
a notebook's or a test's constraint, or ``geco_core.testing`` (its test constraint).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
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
    "HOOKS",
    "DEFAULT_PLUGINS",
]

ENTRY_POINT_GROUP = "geco"
try:
    CORE_VERSION = importlib.metadata.version("geco-core")
except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
    CORE_VERSION = "0.0.0+unknown"
#: geco-core's own plugin modules, registered first (so no plugin can shadow a built-in name)
DEFAULT_PLUGINS = (
    "geco_core.controllers",
    "geco_core.models",
    "geco_core.data",
    "geco_core.training.objectives",
)
PLUGINS_VARIABLE = "GECO_PLUGINS"
#: kind -> the hook that registers it
HOOKS = {
    "constraint": "geco_register_constraints",
    "controller": "geco_register_controllers",
    "model": "geco_register_models",
    "dataset": "geco_register_datasets",
    "objective": "geco_register_objectives",
    "features": "geco_register_feature_networks",
}


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

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The factory's keyword parameters, by name."""
        params = inspect.signature(self.factory).parameters.values()
        return {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

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

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} ({self.distribution}) failed: {self.error}"


@attrs.define
class Registry:
    """Everything the installed plugins registered, by kind and name."""

    entries: dict[str, dict[str, Entry]] = attrs.field(factory=lambda: {k: {} for k in HOOKS})
    failures: list[PluginFailure] = attrs.field(factory=list)

    def get(self, kind: str, name: str) -> Entry:
        """The entry called ``name``, or for ``module:attribute`` that object imported (your own
        model, constraint or data set, without a plugin); a ConfigError listing what is installed
        if there is none."""
        found = self.entries[kind]
        if name in found:
            return found[name]
        if ":" in name:
            found[name] = _imported(kind, name)
            return found[name]
        installed = ", ".join(f"{e.name} ({e.distribution})" for e in found.values()) or "none"
        broken = "; ".join(map(str, self.failures))
        raise ConfigError(f"unknown {kind} {name!r}; installed: {installed}" + (f"; {broken}" if broken else ""))

    def names(self, kind: str) -> list[str]:
        """The registered names of ``kind``, sorted."""
        return sorted(self.entries[kind])


def _imported(kind: str, path: str) -> Entry:
    """The ``kind`` at ``module:attribute`` as an entry; a ConfigError naming what is missing."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{kind} {path!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"{kind} {path!r}: module {module_name!r} has no class or function {attribute!r}")
    doc = (inspect.getdoc(factory) or "").split("\n")[0]
    return Entry(kind, path, factory, module_name, "(import path)", "", doc)


@functools.cache
def registry() -> Registry:
    """Load geco-core's own plugins, every ``geco`` entry point and the modules of
    ``$GECO_PLUGINS``, once, then ask each plugin for its registrations. ``registry.cache_clear()``
    forgets them (tests install plugins on the fly)."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    reg = Registry()
    core = ("geco-core", CORE_VERSION)

    def load(name: str, distribution: str, register: Callable[[], None]) -> None:
        try:
            register()
            pm.check_pending()  # a hook implementation without a spec: a misspelled hook name
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the others down
            if pm.has_plugin(name):
                pm.unregister(name=name)
            reg.failures.append(PluginFailure(name, distribution, _describe(exc)))

    for module in DEFAULT_PLUGINS:
        load(module, core[0], lambda m=module: pm.register(importlib.import_module(m), name=m))
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        if not pm.has_plugin(ep.name) and ep.value not in DEFAULT_PLUGINS:
            dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
            load(ep.name, dist, lambda ep=ep: pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name))
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        if not pm.has_plugin(module):
            load(module, f"${PLUGINS_VARIABLE}", lambda m=module: pm.register(importlib.import_module(m), name=m))
    origin = {id(plugin): (d.project_name, d.version) for plugin, d in pm.list_plugin_distinfo()}
    origin.update({id(pm.get_plugin(m)): core for m in DEFAULT_PLUGINS if pm.has_plugin(m)})
    for kind, hook in HOOKS.items():
        # pluggy lists implementations last-registered first; register in load order instead
        for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):
            dist, version = origin.get(id(impl.plugin), (f"${PLUGINS_VARIABLE}", "-"))
            register = functools.partial(_register, reg, kind, impl.plugin_name, dist, version)
            try:
                impl.function(register=register)
            except Exception as exc:  # noqa: BLE001
                reg.failures.append(PluginFailure(impl.plugin_name, dist, _describe(exc)))
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
    accepted = ", ".join(entry.parameters()) or "nothing"
    unknown = [k for k in kwargs if not entry.accepts(k)]
    if unknown:
        raise ConfigError(f"{kind} {name!r}: unknown argument {unknown[0]!r} (accepts: {accepted})")
    try:
        inspect.signature(entry.factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{kind} {name!r}: {exc} (accepts: {accepted})") from None
    return entry.factory(**kwargs)


def create_constraint(name: str, /, **kwargs: Any) -> Any:
    """``create("constraint", name, **kwargs)``: e.g. ``create_constraint("re", kappa=0.1)``."""
    return create("constraint", name, **kwargs)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
