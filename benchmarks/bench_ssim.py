"""Which SSIM implementation geco-ssim builds on: pytorch-msssim against torchmetrics' functional
SSIM, on random 28 x 28 images (64, one channel) with noise: agreement with a float64 implementation
of the definition (Wang et al. 2004: Gaussian 11 x 11 window, sigma 1.5, valid positions) and the
time of a forward and backward pass, one thread, alternately.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ssim.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "geco_ssim" / "tests"))
from test_ssim import reference  # noqa: E402  - the float64 definition the plugin is tested against


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from geco_core.compat import import_torchvision

    import_torchvision()  # torchmetrics imports it
    import pytorch_msssim
    from torchmetrics.functional.image import structural_similarity_index_measure as torchmetrics_ssim

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    truth = reference(x, y)[:, 0]
    candidates = {
        "pytorch-msssim": lambda a, b: pytorch_msssim.ssim(b, a, data_range=1.0, size_average=False),
        "torchmetrics": lambda a, b: torchmetrics_ssim(b, a, data_range=1.0, reduction="none"),
    }

    def step(fn) -> None:
        x_hat = y.clone().requires_grad_()
        fn(x, x_hat).sum().backward()

    times = {name: [] for name in candidates}
    for r in range(args.rounds):
        for name, fn in list(candidates.items())[:: 1 if r % 2 == 0 else -1]:
            step(fn)
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 1.0:
                step(fn)
                n += 1
            times[name].append((time.perf_counter() - t0) / n)
    print("| implementation | max difference from the definition | forward + backward (ms) |")
    print("| --- | ---: | ---: |")
    for name, fn in candidates.items():
        error = float((fn(x, y).double() - truth).abs().max())
        print(f"| {name} | {error:.1e} | {statistics.median(times[name]) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
