"""The constraint contract (geco_core.testing.ConstraintContract) run over every installed
constraint, in every configuration the project ships: one class of tests per entry of ``SHIPPED``."""

from __future__ import annotations

import pytest

from geco_core import registry
from geco_core.testing import ConstraintContract

#: (test name, constraint, a valid configuration, image shape, distribution)
SHIPPED = [
    ("test-mae", "test-mae", {"kappa": 0.1}, (3, 16, 16), "$GECO_PLUGINS"),
    ("re", "re", {"kappa": 0.1}, (3, 16, 16), "geco-re"),
    ("re-per-channel", "re", {"kappa": 0.1, "per": "channel"}, (3, 16, 16), "geco-re"),
    ("re-per-pixel", "re", {"kappa": 0.2, "per": "pixel"}, (1, 4, 4), "geco-re"),
    ("cla", "cla", {"kappa": 0.9}, (1, 28, 28), "geco-cla"),
    ("cla-probability", "cla", {"kappa": 0.9, "form": "probability"}, (1, 28, 28), "geco-cla"),
    ("cla-three-digits", "cla", {"kappa": 0.8}, (3, 28, 28), "geco-cla"),
    ("fre", "fre", {"kappa": 0.4}, (1, 28, 28), "geco-fre"),
    ("pncc", "pncc", {"kappa": 0.8}, (1, 16, 16), "geco-pncc"),
    ("pncc-joint", "pncc", {"kappa": 0.5, "channels": "joint"}, (3, 16, 16), "geco-pncc"),
]
INSTALLED = set(registry().names("constraint"))

for label, constraint, opts, shape, dist in SHIPPED:
    cls = type(
        f"TestContract_{label.replace('-', '_')}",
        (ConstraintContract,),
        {"name": constraint, "options": opts, "image_shape": shape, "distribution": dist},
    )
    installed = pytest.mark.skipif(constraint not in INSTALLED, reason=f"{constraint} is not installed")
    globals()[cls.__name__] = installed(cls)


def test_every_installed_constraint_is_covered():
    assert INSTALLED <= {c for _, c, _, _, _ in SHIPPED}, "add the new constraint to SHIPPED"
