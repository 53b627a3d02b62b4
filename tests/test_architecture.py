"""The floors of geco_core: every import points down (or stays on its floor), never up; no module
imports torchvision or timm until something that needs them is built."""

from __future__ import annotations

import ast

from helpers import REPO

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
