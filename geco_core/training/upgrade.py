"""Run folders written by earlier versions: their resolved config, as this version reads it, so
that they resume exactly as they were trained. Since 0.4.0 a run folder's ``config.toml`` names the
version that wrote it in its first line (:func:`written_by`); one written by 0.4.0 or later needs
nothing, and earlier ones (which name none) are recognised by their contents (CHANGELOG.md):

* 0.3.0 and earlier: ``controller = "normalised"`` becomes ``controller = "scaled"`` with
  ``formulation = "normalised"`` (the same run).
* 0.2.0, before validation existed (no ``train.validation``): no validation split (``validation = 0``),
  and the controllers' ``margin`` keeps its old default 0.02.
* geco 0.1.0 also wrote every objective's options into one ``[objective]`` table and had no
  multiplier controllers: its options go to the tables of the objectives that take them, and its
  GECO runs keep Algorithm 1 (``controller = "paper"``) and the paper's CLA (``form =
  "probability"``).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["upgrade_resolved", "written_by", "CURRENT_FORMAT"]

#: the first version whose run folders this version reads as they are
CURRENT_FORMAT = (0, 4, 0)


def written_by(text: str) -> tuple[int, ...] | None:
    """The version a resolved config's first line names (``# geco 0.4.0: ...``), None where it names none."""
    match = re.match(r"# geco (\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(g) for g in match.groups()) if match else None


#: options that geco 0.1.0 wrote into [objective] for every objective, and which objectives take them
LEGACY_OPTIONS = {
    "likelihood": ("elbo", "beta", "annealed-beta"),
    "sigma": ("elbo", "beta", "annealed-beta"),
    "learn_sigma": ("elbo", "beta", "annealed-beta"),
    "beta": ("beta",),
    "beta_start": ("annealed-beta",),
    "beta_end": ("annealed-beta",),
    "anneal_steps": ("annealed-beta",),
}


#: controllers whose ``margin`` defaulted to 0.02 before validation existed
MARGIN_CONTROLLERS = ("scaled", "restart", "nupi")


def upgrade_resolved(data: dict[str, Any], version: tuple[int, ...] | None = None) -> dict[str, Any]:
    """A run folder's config document, written by ``version`` (None: before 0.4.0, which did not
    say), as this version writes it (module docstring); one of :data:`CURRENT_FORMAT` or later is
    returned as it is."""
    objective = data.get("objective")
    if (version is not None and version >= CURRENT_FORMAT) or not isinstance(objective, dict):
        return data
    geco = objective.get("geco")
    if isinstance(geco, dict):  # before 0.4.0 the "normalised" controller was scaled + the normalised loss
        controller = geco.get("controller")
        if controller == "normalised" or (isinstance(controller, dict) and controller.get("name") == "normalised"):
            geco["controller"] = "scaled" if controller == "normalised" else {**controller, "name": "scaled"}
            geco["formulation"] = "normalised"
    train = data.setdefault("train", {})
    if isinstance(train, dict) and "validation" not in train:  # trained before validation existed
        train["validation"] = 0
        geco = objective.get("geco")
        controller = geco.get("controller") if isinstance(geco, dict) else None
        if isinstance(controller, str) and controller in MARGIN_CONTROLLERS:
            geco["controller"] = {"name": controller, "margin": 0.02}
        elif isinstance(controller, dict) and controller.get("name") in MARGIN_CONTROLLERS:
            controller.setdefault("margin", 0.02)
    # a legacy option is a plain value; ``beta`` as a table is ``[objective.beta]`` of this version
    keys = {key for key in LEGACY_OPTIONS.keys() & objective.keys() if not isinstance(objective[key], dict)}
    if not keys:
        return data
    legacy = {key: objective.pop(key) for key in keys}
    for key, value in legacy.items():
        for name in LEGACY_OPTIONS[key]:
            objective.setdefault(name, {}).setdefault(key, value)
    objective.setdefault("geco", {}).setdefault("controller", "paper")
    for constraint in data.get("constraints", []):
        if constraint.get("name") == "cla":
            constraint.setdefault("form", "probability")
    return data
