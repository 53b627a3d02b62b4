"""Batching real MNIST: geco's in-memory uint8 tensor indexed per batch, against torchvision's
``MNIST`` dataset with ``ToTensor`` through a ``DataLoader`` (per-sample PIL images), in one run.

    GECO_DATA=../shared/data .venv/bin/python benchmarks/bench_data.py [--batches 300] [--workers 0 2]

Both produce shuffled float batches (64, 1, 28, 28) in [0, 1]; reports images per second and ratios.
torchvision needs a writable copy of the .gz files (it extracts them), made in a temporary folder.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from geco_core.compat import import_torchvision
from geco_core.data import Batches, resolve_root
from geco_core.data.mnist import MNIST, mnist

torchvision = import_torchvision()


def images_per_second(batches, n: int) -> float:
    it = iter(batches)
    next(it)  # warm-up: first batch (and worker start-up) not timed
    start = time.perf_counter()
    count = 0
    for _ in range(n):
        x = next(it)
        count += len(x)
    return count / (time.perf_counter() - start)


def geco_batches(batch_size: int):
    data = mnist(split="train")  # decoded once into memory (and cached for the process)
    sampler = Batches(len(data), batch_size, seed=0)
    step = 0
    while True:
        yield data.batch(sampler(step)).x
        step += 1


def torchvision_batches(root: Path, batch_size: int, workers: int):
    ds = torchvision.datasets.MNIST(str(root), train=True, download=True, transform=torchvision.transforms.ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    while True:
        for x, _ in loader:
            yield x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for f in MNIST.files:
            shutil.copy(resolve_root() / "MNIST" / "raw" / f, raw / f)
        mnist(split="train")  # decode once before timing, as a training run does at start-up
        ours = images_per_second(geco_batches(args.batch_size), args.batches)
        print(f"batches of {args.batch_size}, {args.batches} timed batches, threads {torch.get_num_threads()}")
        print(f"  geco in-memory uint8 indexing:      {ours:12,.0f} images/s")
        for w in args.workers:
            theirs = images_per_second(torchvision_batches(Path(tmp), args.batch_size, w), args.batches)
            print(
                f"  torchvision MNIST + DataLoader(num_workers={w}): {theirs:10,.0f} images/s"
                f"   ratio geco/torchvision {ours / theirs:6.1f}x"
            )


if __name__ == "__main__":
    main()
