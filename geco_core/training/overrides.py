"""``--set section.key=value``: overrides of a config document before it is structured."""

from __future__ import annotations

import tomllib
from typing import Any

from geco_core.errors import ConfigError

__all__ = ["parse_override", "apply_override"]


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
