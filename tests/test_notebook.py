"""The tutorial notebook (docs/tutorial.ipynb) runs as written, its cells in order, shortened to a
few dozen steps: the finder's result, the GECO run at the suggested kappa with held-out kappa, and
the test-set evaluation, on real MNIST."""

from __future__ import annotations

import json
import math

from helpers import REPO
from test_data import needs_mnist


@needs_mnist
def test_the_tutorial_notebook_runs_its_cells_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("GECO_TUTORIAL_STEPS", "80")
    monkeypatch.chdir(tmp_path)
    notebook = json.loads((REPO / "docs" / "tutorial.ipynb").read_text())
    assert notebook["nbformat"] == 4
    scope = {"print": lambda *a, **k: None}
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] for c in code)  # shipped without stale outputs
    for cell in code:
        exec(compile("".join(cell["source"]), "tutorial.ipynb", "exec"), scope)
    result, geco = scope["result"], scope["geco"]
    assert len(result.points) == 40 and result.suggestion() == scope["kappa"]
    assert (tmp_path / "kappa.png").stat().st_size > 5000
    assert int(geco.step) == 80 and bool(geco.validated)  # held-out kappa was measured
    assert float(geco.constraints[0].kappa) == scope["kappa"]
    assert math.isfinite(scope["test_rmse"]) and 0 < scope["test_rmse"] < 0.5 and scope["test_kl"] >= 0
