"""The README's Python examples run as written (with a tiny stand-in for the user's data loader)."""

from __future__ import annotations

import re
import textwrap

import torch
from helpers import REPO


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_the_own_loop_example_trains_and_moves_lambda():
    (block,) = [b for b in python_blocks() if "for x in loader" in b]
    scope = {"loader": [torch.rand(8, 1, 28, 28) for _ in range(3)], "print": lambda *a: None}
    exec(compile(block, "README.md", "exec"), scope)
    assert int(scope["geco"].step) == 3 and scope["geco"].lambdas.item() != 1.0


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
