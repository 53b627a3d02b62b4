"""The README's Python examples run as written (with tiny stand-ins for the user's data loader and
the quickstart's length)."""

from __future__ import annotations

import re
import textwrap

import torch
from helpers import REPO


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_the_own_loop_example_trains_moves_lambda_and_skips_non_finite_batches():
    (block,) = [b for b in python_blocks() if "for x, y in loader" in b]
    images = [torch.rand(8, 1, 28, 28) for _ in range(4)]
    images[2][0, 0, 0, 0] = float("nan")  # a broken batch: its step must be skipped, the model kept finite
    loader = [(x, torch.randint(0, 10, (8,))) for x in images]
    scope = {"loader": loader, "print": lambda *a: None}
    exec(compile(block, "README.md", "exec"), scope)
    geco, model = scope["geco"], scope["model"]
    assert int(geco.step) == 3 and int(geco.skipped) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    start = type(geco)([scope["re"]], alpha=0.9).lambdas  # where the same GECO starts
    assert geco.lambdas.item() > start.item()  # random images are far above kappa: lambda rose


def test_the_callback_example_runs_and_its_callback_sees_every_record(tmp_path, monkeypatch, capsys):
    (block,) = [b for b in python_blocks() if "class PrintLambda(Callback)" in b]
    monkeypatch.chdir(REPO)
    block = block.replace('overrides=["train.steps=20"]', f'overrides=["train.steps=20", "logging.dir=\'{tmp_path}\'"]')
    exec(compile(block, "README.md", "exec"), {})
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [int(p[0]) for p in printed] == [10, 20] and all(float(p[1]) > 0 for p in printed)


def test_the_plugin_example_defines_a_working_constraint():
    (block,) = [b for b in python_blocks() if "geco_register_constraints" in b]
    scope: dict = {}
    exec(compile(textwrap.dedent(block), "README.md", "exec"), scope)
    registered = []
    scope["geco_register_constraints"](registered.append)
    (cls,) = registered
    from geco_core import Batch

    mae = cls(kappa=0.1)
    x = torch.rand(4, 1, 5, 5)
    values = mae(Batch(x=x, x_hat=x + 0.2))
    torch.testing.assert_close(values, torch.full((4, 1), 0.1))
    torch.testing.assert_close(mae.reached(values), torch.full((4, 1), 0.2))
