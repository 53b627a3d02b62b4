"""Shipped weight files of frozen networks (FRE's features, CLA's classifier): checked and loaded.

Public, for plugins: ``load_safetensors(path, owner=..., sha256_expected=...)`` reads a safetensors file
(never a pickle) and, for a file shipped with a package, checks it against its recorded sha256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import Tensor

from geco_core.errors import ConfigError

__all__ = ["sha256", "load_safetensors"]


def sha256(path: str | Path) -> str:
    """The hex sha256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_safetensors(
    path: str | Path, *, owner: str, sha256_expected: str | None = None, distribution: str = ""
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file. A missing file, a checksum that differs from
    ``sha256_expected`` (a damaged install of ``distribution``), or an unreadable file is a
    one-line :class:`ConfigError` that starts with ``owner`` (the constraint's name)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{owner}: no weights at {path}")
    if sha256_expected is not None and sha256(path) != sha256_expected:
        raise ConfigError(
            f"{owner}: {path} does not match its recorded sha256 {sha256_expected}; reinstall {distribution or owner}"
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as exc:  # noqa: BLE001 - a wrong or damaged file
        raise ConfigError(f"{owner}: cannot read weights {path}: {str(exc).splitlines()[0]}") from None
