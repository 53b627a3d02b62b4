"""Run folders written by geco 0.1.0: their resolved config, as this version reads it.

geco 0.1.0 wrote every objective's options into one ``[objective]`` table and had no multiplier
controllers. On reading, its options go to the tables of the objectives that take them, and its
GECO runs keep Algorithm 1 (``controller = "paper"``) and the paper's CLA (``form =
"probability"``), as they were trained.
"""

from __future__ import annotations

from typing import Any

__all__ = ["upgrade_resolved"]

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


def upgrade_resolved(data: dict[str, Any]) -> dict[str, Any]:
    """A run folder's config document as this version writes it (module docstring); a document of
    this version is returned as it is."""
    objective = data.get("objective")
    if not isinstance(objective, dict):
        return data
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
