"""Fixtures shared by the tests in this folder."""

from __future__ import annotations

import pytest
from helpers import run_geco


@pytest.fixture
def geco_cli():
    return run_geco
