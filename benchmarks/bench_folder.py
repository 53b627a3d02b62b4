"""Your own images: training batches read from a folder's decoded cache in memory against the same
cache memory-mapped (``data.memory_map = true``), in one run; and what the first decoding and a
cached start cost.

    GECO_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_folder.py \\
        [--images 20000] [--batches 300] [--batch-size 64]

The folder: ``--images`` PNG files of real MNIST digits (28 x 28, ten class folders) written to a
temporary directory. Reports images per second of shuffled batches (``ImageData.batch``, floats in
[0, 1]) and their ratio, with the page cache warm (the file read once before) and, where the
kernel lets this process drop it (``posix_fadvise`` DONTNEED), cold.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from geco_core.data import Batches, folder
from geco_core.data.mnist import mnist


def write_folder(root: Path, n: int) -> Path:
    from PIL import Image

    data = mnist(split="train")
    for i in range(n):
        label = int(data.labels[i])
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i, 0].numpy()).save(root / str(label) / f"{i:06d}.png")
    return root


def images_per_second(data, batches: int, batch_size: int) -> float:
    sampler = Batches(len(data), batch_size, seed=0)
    data.batch(sampler(0))  # warm-up
    start = time.perf_counter()
    for step in range(1, batches + 1):
        data.batch(sampler(step))
    return batches * batch_size / (time.perf_counter() - start)


def drop_page_cache(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp) / "digits", args.images)
        start = time.perf_counter()
        memory = folder(str(root))
        decode = time.perf_counter() - start
        start = time.perf_counter()
        memory = folder(str(root))
        cached = time.perf_counter() - start
        (cache,) = (root / ".geco-cache").glob("*.u8")
        rows = [("in memory", images_per_second(memory, args.batches, args.batch_size))]
        if drop_page_cache(cache):  # a fresh mapping of a file no longer in the page cache
            cold = folder(str(root), memory_map=True)
            rows.append(("memory-mapped, page cache dropped", images_per_second(cold, args.batches, args.batch_size)))
        mapped = folder(str(root), memory_map=True)
        images_per_second(mapped, args.batches, args.batch_size)  # every page read once
        rows.append(("memory-mapped, page cache warm", images_per_second(mapped, args.batches, args.batch_size)))
        rows.append(("in memory, again", images_per_second(memory, args.batches, args.batch_size)))
    print(f"{args.images} PNG files: first decoding {decode:.1f} s, a cached start {cached:.2f} s\n")
    print("| batches from | images/s | / in memory |\n|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
