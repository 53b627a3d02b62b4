"""Helpers shared by the tests: the repository root, the ``geco`` command as a user runs it, a run's
records, and whether the constraint plugins are installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from geco_core.training import Run

REPO = Path(__file__).resolve().parents[1]

#: for the tests that are about the real constraint plugins (the rest use geco_core.testing's)
needs_plugins = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("geco_re", "geco_cla", "geco_fre", "geco_pncc")),
    reason="the constraint plugins (plugins/) are not installed",
)


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


def records(run_dir) -> list[dict]:
    """Every logged record of the run in ``run_dir``."""
    return Run.open(run_dir).read_metrics()
