"""What caching FRE's target features saves: training steps of the conv VAE with GECO + FRE on
MNIST, with ``cache = false`` and ``cache = true`` (measured once the cache holds the examples),
in one run.

    GECO_DATA=../shared/data .venv/bin/python benchmarks/bench_fre_cache.py [--examples 2048] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from geco_core.training import build
from geco_core.training.config import Config


def experiment(cache: bool, batch_size: int):
    cfg = Config.from_dict(
        {
            "data": {"name": "mnist"},
            "model": {"name": "conv-vae", "latent_dim": 32},
            "objective": {"name": "geco"},
            "constraints": [{"name": "fre", "kappa": 0.4, "cache": cache}],
            "train": {"batch_size": batch_size},
        }
    )
    return build(cfg, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2048, help="cycle over the first N training examples")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runs = {name: experiment(name == "cache", args.batch) for name in ("no cache", "cache")}
    per_epoch = args.examples // args.batch
    for exp in runs.values():  # both cycle over the same subset; the cached run fills its cache
        exp.batches = lambda step, n=per_epoch, b=args.batch: torch.arange((step % n) * b, (step % n + 1) * b)
        for step in range(per_epoch):
            exp.step(step)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, exp in list(runs.items())[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            for step in range(args.steps):
                exp.step(step)
            times[name].append((time.perf_counter() - start) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"conv-vae + GECO/FRE on MNIST, batch {args.batch}, threads {torch.get_num_threads()}, "
        f"median of {args.rounds} blocks of {args.steps} steps"
    )
    for name in runs:
        print(f"  {name:8s}: {med[name] * 1e3:7.2f} ms per step")
    print(f"  ratio no cache / cache: {med['no cache'] / med['cache']:.3f}")


if __name__ == "__main__":
    main()
