"""What loading the plugins costs: `geco constraints` and `create_constraint("re")` in fresh processes,
this checkout against another one (e.g. the previous release), alternately.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_plugins.py [--old /path/to/old/checkout] [--rounds 5]

The old checkout runs with this environment's installed entry points and its own ``geco_core`` and
``plugins/*`` first on ``PYTHONPATH`` (entry points that only this version declares fail to load
there, quietly, at negligible cost). Reports the median wall time of each process and whether it
imported torchvision.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "geco constraints": "from geco_core.cli import main; main(['constraints'])",
    'create_constraint("re")': "from geco_core.plugins import create_constraint; create_constraint('re', kappa=0.1)",
}
PROBE = "; import sys; print('TORCHVISION', 'torchvision' in sys.modules)"


def timed(code: str, pythonpath: str | None) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: '' on sys.path would shadow PYTHONPATH
        out = subprocess.run(
            [sys.executable, "-c", code + PROBE], env=env, cwd=cwd, capture_output=True, text=True, check=True
        )
    return time.perf_counter() - start, "TORCHVISION True" in out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="another checkout of geco to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    versions: dict[str, str | None] = {"this checkout": None}
    if args.old:
        old = Path(args.old).resolve()
        versions["old checkout"] = os.pathsep.join([str(old), *(str(p) for p in sorted((old / "plugins").iterdir()))])
    print("| command | checkout | median s (min-max) | imports torchvision |\n| --- | --- | ---: | --- |")
    for case, code in CASES.items():
        times: dict[str, list[float]] = {v: [] for v in versions}
        loads: dict[str, bool] = {}
        for _ in range(args.rounds):
            for version, path in versions.items():
                seconds, loads[version] = timed(code, path)
                times[version].append(seconds)
        for version, t in times.items():
            spread = f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})"
            print(f"| `{case}` | {version} | {spread} | {'yes' if loads[version] else 'no'} |")


if __name__ == "__main__":
    main()
