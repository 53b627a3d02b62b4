"""The floors of geco_core: every import points down (or stays on its floor), never up; no module
imports torchvision or timm until something that needs them is built."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from helpers import REPO, needs_plugins

PACKAGE = REPO / "geco_core"

#: floor of each part of geco_core; a module may import only from its own floor or lower ones
FLOORS = {
    "geco_core": 0,  # the algorithm: constraint contract, GECO, controllers, registry, errors
    "geco_core.models": 1,
    "geco_core.data": 1,
    "geco_core.figures": 1,
    "geco_core.training": 2,
    "geco_core.evaluation": 3,
    "geco_core.cli": 4,
}


def floor_of(module: str) -> tuple[int, str]:
    """The floor of a module and the part it belongs to (the longest matching prefix)."""
    part = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[part], part


def module_name(path, root=REPO) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path, modules: set[str] = frozenset()) -> list[str]:
    """Every geco_core module imported by the file, at module level, inside functions or only for
    type checking; ``from a import b`` counts as importing ``a.b`` where that is one of ``modules``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            found += subs or [node.module]
    return [m for m in found if m == "geco_core" or m.startswith("geco_core.")]


def import_graph(root=REPO) -> dict[str, set[str]]:
    """Module of ``root/geco_core`` -> the geco_core modules it imports (a package's own __init__,
    which Python runs before any of its submodules, is not counted as imported by them)."""
    paths = {module_name(p, root): p for p in sorted((root / "geco_core").rglob("*.py"))}
    return {m: set(imports_of(p, set(paths))) - {m} for m, p in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, once each (as the list of modules around it)."""
    found, seen = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                circle = path[path.index(nxt) :]
                key = frozenset(circle)
                if key not in seen:
                    seen.add(key)
                    found.append(circle)
            elif nxt in graph and (node, nxt) not in done:
                done.add((node, nxt))
                visit(nxt, [*path, nxt])

    done: set[tuple[str, str]] = set()
    for start in sorted(graph):
        visit(start, [start])
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs up a floor, or across to a sibling part of the same floor above 0 (the
    package itself, ``geco_core``, is the algorithm floor's public API: any floor may use it)."""
    found = []
    for me, targets in sorted(graph.items()):
        my_floor, my_part = floor_of(me)
        for target in sorted(targets):
            if target == "geco_core" and my_floor > 0:
                continue
            floor, part = floor_of(target)
            if floor > my_floor or (floor == my_floor and part != my_part and my_floor > 0):
                found.append(f"{me} (floor {my_floor}) imports {target} (floor {floor})")
    return found


def test_no_import_runs_up_a_floor_and_siblings_stay_apart():
    violations = upward_imports(import_graph())
    assert not violations, "\n".join(violations)


def test_the_floor_check_would_catch_a_planted_upward_or_sideways_import(tmp_path):
    for part in ("training", "models", "data"):
        (tmp_path / "geco_core" / part).mkdir(parents=True)
        (tmp_path / "geco_core" / part / "__init__.py").write_text("")
    (tmp_path / "geco_core" / "__init__.py").write_text("")
    (tmp_path / "geco_core" / "geco.py").write_text("def f():\n    from geco_core.training import loop\n")
    (tmp_path / "geco_core" / "training" / "loop.py").write_text("import geco_core.geco\n")  # down: fine
    (tmp_path / "geco_core" / "models" / "vae.py").write_text("from geco_core.data import base\n")  # sideways
    (tmp_path / "geco_core" / "data" / "base.py").write_text("")
    assert upward_imports(import_graph(tmp_path)) == [
        "geco_core.geco (floor 0) imports geco_core.training.loop (floor 2)",
        "geco_core.models.vae (floor 1) imports geco_core.data.base (floor 1)",
    ]


def _modules_after(code: str) -> set[str]:
    """The top-level modules loaded after running ``code`` in a fresh interpreter."""
    script = textwrap.dedent(code) + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_algorithm_layer_imports_no_training_evaluation_or_vision_code():
    loaded = _modules_after("from geco_core import GECO, Batch, create_constraint")
    assert not loaded & {"torchvision", "timm", "matplotlib", "tensorboard"}
    script = "import geco_core, sys; print(sorted(m for m in sys.modules if m.startswith('geco_core.')))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "geco_core.training" not in out and "geco_core.evaluation" not in out


@needs_plugins
def test_building_re_and_listing_constraints_pay_no_torchvision_import():
    assert "torchvision" not in _modules_after(
        "from geco_core import create_constraint; create_constraint('re', kappa=0.1)"
    )
    listed = _modules_after("from geco_core.cli import main; main(['constraints'])")
    assert not listed & {"torchvision", "timm"}
    # FRE loads them when it is built, and not before
    assert {"torchvision", "timm"} <= _modules_after(
        "from geco_core import create_constraint; create_constraint('fre', kappa=0.4)"
    )


def test_no_import_circles_at_all_type_only_and_function_level_imports_included():
    circles = cycles(import_graph())
    assert not circles, "\n".join(" -> ".join([*c, c[0]]) for c in circles)


def test_the_circle_check_would_catch_one_even_through_a_type_only_import(tmp_path):
    package = tmp_path / "geco_core"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from geco_core.b import B\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from geco_core.a import A\n"
    )
    assert cycles(import_graph(tmp_path)) == [["geco_core.a", "geco_core.b"]]


def test_only_the_state_module_spells_a_metric_key_of_a_component():
    """GECO's per-component state travels as typed records (geco_core.state); the flat keys
    (``re/lambda``) are written, and read back from files, through ``state.key`` alone."""
    fields = ("c_hat", "c_ma", "lambda", "beta", "reached", "unreachable", "best", "best_step", "restarted")
    spelled = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "state.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if any(node.value.endswith(f"/{f}") for f in fields):
                    spelled.append(f"{module_name(path)}: {node.value!r}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "endswith"):
                if any(isinstance(a, ast.Constant | ast.JoinedStr) and "/" in ast.unparse(a) for a in node.args):
                    spelled.append(f"{module_name(path)}: {ast.unparse(node)}")
    assert not spelled, "\n".join(spelled)
