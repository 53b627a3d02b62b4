"""Shared test set-up: hypothesis without deadlines (timings on a loaded 2-core machine vary)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("default", deadline=None, max_examples=60)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


REPO = Path(__file__).resolve().parents[1]


def run_geco(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run the installed ``geco`` command as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "geco_core.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture
def geco_cli():
    return run_geco
