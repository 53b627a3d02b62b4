"""geco: train VAEs with GECO (Rezende & Viola 2018), constraints stated in data space.

The algorithm layer is importable on its own::

    from geco_core import GECO, Batch, create_constraint
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from geco_core.constraint import Batch, Constraint, ConstraintLike, check_same_shape, freeze
from geco_core.errors import CheckpointError, ConfigError, DataError, GecoError, NonFiniteConstraintError
from geco_core.geco import GECO
from geco_core.hookspecs import hookimpl
from geco_core.plugins import create, create_constraint, registry

try:
    __version__ = version("geco-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "GECO",
    "Batch",
    "Constraint",
    "ConstraintLike",
    "check_same_shape",
    "freeze",
    "hookimpl",
    "create",
    "create_constraint",
    "registry",
    "GecoError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "NonFiniteConstraintError",
    "__version__",
]
