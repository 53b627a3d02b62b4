"""Settings for every test directory (tests/ and each plugin's tests/): hypothesis without deadlines,
since timings on a loaded 2-core machine vary."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("default", deadline=None, max_examples=60)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# geco's own test constraint (``test-mae``) loads as a plugin in this process and in every `geco`
# the tests start, without being installed: the core suite needs no constraint plugin.
os.environ["GECO_PLUGINS"] = ",".join(
    dict.fromkeys(filter(None, [*os.environ.get("GECO_PLUGINS", "").split(","), "geco_core.testing"]))
)

pytest_plugins = ["pytester"]  # the contract kit's own tests run a kit subclass in a scratch pytest
