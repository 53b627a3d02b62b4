"""A finished distributed run exits 0: many consecutive 2-process runs under torchrun, each counted
as aborted when a process ends by a signal or prints libstdc++'s "terminate called without an
active exception" (gloo torn down during interpreter finalisation).

    .venv/bin/python benchmarks/stress_exit.py --runs 50 [--finalise]

``--finalise`` runs the same with the processes finalising the interpreter as they did before
``exit_process`` (``sys.exit`` instead), to compare. A CPU hog on the other core (``--load``)
reproduces a loaded machine (CI's).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

LAUNCH = """
import sys
if {finalise}:
    import geco_core.training.distributed as d
    d.exit_process = sys.exit  # the old way out: finalise the interpreter
from geco_core.cli import main
sys.exit(main())
"""


def hog(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def main() -> None:
    from test_training import TINY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--finalise", action="store_true")
    parser.add_argument("--load", action="store_true", help="a busy loop on another core meanwhile")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GECO_PLUGINS": "geco_core.testing"}
    aborted, seconds = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        doc = {**TINY, "train": {**TINY["train"], "steps": 12, "batch_size": 32}}
        doc["logging"] = {**doc["logging"], "plots": False, "tensorboard": False, "dir": tmp}
        config = Path(tmp) / "tiny.toml"
        config.write_text(tomli_w.dumps(doc))
        launch = Path(tmp) / "launch.py"
        launch.write_text(LAUNCH.format(finalise=args.finalise))
        busy = multiprocessing.Process(target=hog, args=(10**6,), daemon=True) if args.load else None
        if busy:
            busy.start()
        for k in range(args.runs):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(launch), "train", str(config), "--quiet"]  # fmt: skip
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            seconds.append(time.perf_counter() - t0)
            bad = done.returncode != 0 or "terminate called without an active exception" in done.stderr
            aborted += bad
            print(f"run {k + 1}: exit {done.returncode}{' ABORTED' if bad else ''}", flush=True)
        if busy:
            busy.terminate()
    way = "finalising the interpreter" if args.finalise else "exit_process"
    print(f"{args.runs} runs of 2 processes ({way}{', one core loaded' if args.load else ''}): "
          f"{aborted} aborted; {sum(seconds) / len(seconds):.1f} s a run")  # fmt: skip


if __name__ == "__main__":
    main()
