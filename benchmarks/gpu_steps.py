"""Step times of shipped configs on the GPU, compile off and on (``benchmarks/gpu.sh`` runs it).

    .venv/bin/python benchmarks/gpu_steps.py [--configs quickstart mnist-geco-re] [--steps 300] [--json F]

Each config trains ``--steps`` steps on the device (the MNIST config reads ``$GECO_DATA``); the time
per step is the median over the steps after the first 50 (compile's and the allocator's warm-up),
from the end of one step to the end of the next, the device synchronised at each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from geco_core.training import Callback, train

REPO = Path(__file__).resolve().parents[1]


class StepTimes(Callback):
    """The wall time of each step from the end of the one before, synchronised with the device."""

    def __init__(self, skip: int = 50) -> None:
        self.skip, self.times, self.last = skip, [], None

    def on_step_end(self, trainer, metrics) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        if self.last is not None and trainer.step > self.skip:
            self.times.append(now - self.last)
        self.last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["quickstart", "mnist-geco-re"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for name in args.configs:
        for compile_ in (False, True):
            sets = [f"train.steps={args.steps}", "train.device='cuda'", f"train.compile={str(compile_).lower()}",
                    "logging.progress=false", "logging.plots=false", "logging.eval_examples=0",
                    "logging.tensorboard=false", "train.validation=0"]  # fmt: skip
            timer = StepTimes()
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    train(REPO / "configs" / f"{name}.toml", overrides=sets, run_dir=Path(tmp) / "run",
                          extra_callbacks=[timer])  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - report and go on with the others
                    print(f"{name} compile={compile_}: failed: {str(exc).splitlines()[0]}")
                    continue
            ms = statistics.median(timer.times) * 1e3
            rows.append({"config": name, "compile": compile_, "ms_per_step": ms, "steps": len(timer.times)})
            print(f"{name:16s} compile={str(compile_):5s} {ms:8.2f} ms/step ({len(timer.times)} steps timed)")
    for name in args.configs:
        pair = {r["compile"]: r["ms_per_step"] for r in rows if r["config"] == name}
        if len(pair) == 2:
            print(f"{name}: compiled / eager {pair[True] / pair[False]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
