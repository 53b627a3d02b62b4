"""Helpers shared by the tests: the repository root and the ``geco`` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
