"""Hook specifications of the ``geco`` plugin system (pluggy).

A plugin is a module announced in the entry-point group ``geco``; it implements any of these hooks
with ``@geco_core.hookimpl`` and calls ``register`` once per thing it provides::

    @hookimpl
    def geco_register_constraints(register):
        register(MyConstraint)            # a Constraint subclass with a class attribute ``name``

``register(factory, name=None, description=None)``: ``name`` defaults to ``factory.name``, the
description to the first paragraph of its docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

__all__ = ["hookspec", "hookimpl"]

hookspec = pluggy.HookspecMarker("geco")
hookimpl = pluggy.HookimplMarker("geco")

Register = Callable[..., Any]


@hookspec
def geco_register_constraints(register: Register) -> None:
    """Register constraint classes (``Constraint`` subclasses)."""


@hookspec
def geco_register_controllers(register: Register) -> None:
    """Register multiplier controllers (``geco_core.controllers.Controller`` subclasses)."""


@hookspec
def geco_register_models(register: Register) -> None:
    """Register model classes or factories (``VAE`` subclasses)."""


@hookspec
def geco_register_datasets(register: Register) -> None:
    """Register dataset factories (returning ``ImageData``)."""


@hookspec
def geco_register_objectives(register: Register) -> None:
    """Register training objectives (``Objective`` subclasses)."""


@hookspec
def geco_register_feature_networks(register: Register) -> None:
    """Register feature networks for the Fréchet distance of ``geco eval``: factories taking
    ``image_shape`` and returning an ``nn.Module`` from pixels ``(B, C, H, W)`` in [0, 1] to
    features ``(B, num_features)``, with a class attribute ``datasets``, the data set names whose
    images it reads."""
