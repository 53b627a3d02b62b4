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
    ("ssim", "ssim", {"kappa": 0.9}, (1, 28, 28), "geco-ssim"),
    ("ssim-per-channel", "ssim", {"kappa": 0.8, "per": "channel"}, (3, 16, 16), "geco-ssim"),
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


def test_the_kit_skips_what_it_cannot_check_rather_than_reporting_a_pass(pytester):
    """A constraint with no units to map back to and no training mode: the two checks that need
    them are reported skipped, with the reason, never passed."""
    pytester.makepyfile(
        """
        import torch
        from geco_core.testing import ConstraintContract

        class Plain:  # no nn.Module, and reached() maps nothing back
            name, units, kappa, dim, multiplier_scale, value_scale = "plain", "u", 0.1, 1, 1.0, 1.0
            component_names = ["plain"]

            def reached(self, values):
                return None

            def __call__(self, batch):
                return (batch.x - batch.x_hat).abs().flatten(1).mean(1, keepdim=True) - self.kappa

        class TestPlain(ConstraintContract):
            name = "plain"
            options = {"kappa": 0.1}

            def make(self, **changes):
                return Plain()
        """
    )
    result = pytester.runpytest("-k", "satisfied_exactly or frozen_networks", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*plain maps no values back*", "*plain is not an nn.Module*"])
