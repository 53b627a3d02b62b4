"""Step time of `geco train` on 1 process against 2 processes under torchrun (gloo), the same config
and global batch: the quickstart (conv VAE, 3x32x32, GECO + RE), 300 steps, alternately.

    .venv/bin/python benchmarks/bench_ddp.py [--steps 300] [--rounds 2] [--batch 64]

Both use all the machine's cores: one process with as many threads as cores, or N processes with
cores / N threads each. Reports the training loop's seconds per step (from the run's summary).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(folder: Path, processes: int, steps: int, batch: int) -> float:
    cores = os.cpu_count() or 1
    threads = max(1, cores // processes)
    sets = [
        f"train.steps={steps}", f"train.batch_size={batch}", f"train.threads={threads}", "train.device='cpu'",
        "logging.progress=false", "logging.plots=false", "logging.tensorboard=false", "logging.eval_examples=0",
        f"train.checkpoint_every={steps}",
    ]  # fmt: skip
    args = ["train", str(REPO / "configs" / "quickstart.toml"), "--run-dir", str(folder)]
    args += [a for s in sets for a in ("--set", s)]
    launcher = [sys.executable, "-m", "geco_core.cli"]
    if processes > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        launcher = [*torchrun, "-m", "geco_core.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*launcher, *args], check=True, capture_output=True, env=env)
    return json.loads((folder / "summary.json").read_text())["seconds"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in (1, 2)[:: 1 if r % 2 == 0 else -1]:
                times[n].append(run(Path(tmp) / f"{n}-{r}", n, args.steps, args.batch))
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"{os.cpu_count()} cores, quickstart, global batch {args.batch}, {args.steps} steps, median of {args.rounds}")
    print(f"  1 process : {one * 1e3:7.1f} ms per step")
    print(f"  2 processes: {two * 1e3:7.1f} ms per step   speed-up {one / two:.2f}x")


if __name__ == "__main__":
    main()
