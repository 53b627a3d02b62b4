"""geco: train VAEs with GECO (Rezende & Viola 2018), constraints stated in data space.

The algorithm layer, importable on its own (torch, pluggy and attrs only)::

    from geco_core import GECO, Batch, create_constraint

Floors, each importing only the ones before it: this package (constraint contract, GECO and its
multiplier controllers, registry, errors) <- ``geco_core.models``, ``geco_core.data`` <-
``geco_core.training`` <- ``geco_core.evaluation`` <- ``geco_core.cli``.
"""

from __future__ import annotations

import os

# Idle OpenMP workers sleep instead of spinning: on a CPU shared with other work, spinning workers
# slowed a training step up to 16x (docs/BENCHMARKS.md, "Threads on a shared CPU"). OpenMP reads
# this when torch loads it, so it is set before anything imports torch; a value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from geco_core.constraint import (
    Batch,
    Constraint,
    ConstraintLike,
    ConstraintStack,
    Units,
    check_kappa,
    check_same_shape,
    freeze,
)
from geco_core.controllers import Controller
from geco_core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GecoError,
    NonFiniteConstraintError,
    RunFolderError,
)
from geco_core.geco import GECO
from geco_core.hookspecs import hookimpl
from geco_core.optim import step_if_finite, step_where
from geco_core.plugins import CORE_VERSION as __version__
from geco_core.plugins import create, create_constraint, registry

__all__ = [
    "GECO",
    "Batch",
    "Constraint",
    "ConstraintLike",
    "ConstraintStack",
    "Units",
    "Controller",
    "check_kappa",
    "check_same_shape",
    "freeze",
    "hookimpl",
    "step_if_finite",
    "step_where",
    "create",
    "create_constraint",
    "registry",
    "GecoError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "RunFolderError",
    "NonFiniteConstraintError",
    "__version__",
]
