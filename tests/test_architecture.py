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
    "geco_core.training": 2,
    "geco_core.evaluation": 3,
    "geco_core.cli": 4,
}


def floor_of(module: str) -> tuple[int, str]:
    """The floor of a module and the part it belongs to (the longest matching prefix)."""
    part = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[part], part


def module_name(path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path) -> list[str]:
    """Every geco_core module imported by the file, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return [m for m in found if m == "geco_core" or m.startswith("geco_core.")]


def test_no_import_runs_up_a_floor_and_siblings_stay_apart():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        my_floor, my_part = floor_of(me)
        for target in imports_of(path):
            if target == "geco_core" and my_floor > 0:
                continue  # the package's public API is the algorithm floor
            floor, part = floor_of(target)
            if floor > my_floor or (floor == my_floor and part != my_part and my_floor > 0):
                violations.append(f"{me} (floor {my_floor}) imports {target} (floor {floor})")
    assert not violations, "\n".join(violations)


def test_the_floor_check_would_catch_an_import_running_up(tmp_path):
    bad = tmp_path / "geco_core" / "geco.py"
    bad.parent.mkdir()
    bad.write_text("from geco_core.training import train\n")
    assert imports_of(bad) == ["geco_core.training"]
    assert floor_of("geco_core.training.loop")[0] > floor_of("geco_core.geco")[0]


def _modules_after(code: str) -> set[str]:
    """The top-level modules loaded after running ``code`` in a fresh interpreter."""
    script = textwrap.dedent(code) + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_algorithm_layer_imports_no_training_evaluation_or_vision_code():
    loaded = _modules_after("from geco_core import GECO, Batch, create_constraint")
    assert not loaded & {"torchvision", "timm", "matplotlib", "tensorboard"}  # (torch itself imports tqdm)
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


def test_idle_openmp_threads_sleep_unless_the_user_chose_otherwise():
    """geco sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP (spinning workers slowed a step
    up to 16x on a shared CPU, docs/BENCHMARKS.md), and keeps a value the user set."""
    import os

    script = "import geco_core, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "ACTIVE"
