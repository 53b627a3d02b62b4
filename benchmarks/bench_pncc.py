"""pNCC with box filters (geco-pncc) against the same quantity from materialised patches (``unfold``),
forward and backward, in one run; reports times and the ratio.

    .venv/bin/python benchmarks/bench_pncc.py
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from geco_pncc import patch_ncc
from torch.utils import benchmark


def ncc_unfold(x: torch.Tensor, y: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """Every k x k patch as a vector (per channel), centred, extended by sqrt(eps), normalised, dotted."""
    b, c, h, w = x.shape

    def whitened(t: torch.Tensor) -> torch.Tensor:
        p = F.unfold(t.reshape(b * c, 1, h, w), k)  # (B*C, k*k, L)
        p = (p - p.mean(1, keepdim=True)) / math.sqrt(k * k)
        p = torch.cat([p, torch.full_like(p[:, :1], math.sqrt(eps))], dim=1)
        return p / p.norm(dim=1, keepdim=True)

    return (whitened(x) * whitened(y)).sum(1).reshape(b, c, h - k + 1, w - k + 1)


def main() -> None:
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}; forward + backward of the mean NCC, median of 1 s blocks")
    for shape, k in [((64, 1, 28, 28), 5), ((64, 3, 32, 32), 5), ((64, 3, 32, 32), 9), ((16, 3, 64, 64), 9)]:
        x = torch.rand(shape)
        y = torch.rand(shape, requires_grad=True)
        torch.testing.assert_close(patch_ncc(x, y, k), ncc_unfold(x, y, k), rtol=1e-4, atol=1e-4)
        times = {}
        for name, fn in (("box filters", patch_ncc), ("unfold", ncc_unfold)):
            stmt = "fn(x, y, k).mean().backward()"
            t = benchmark.Timer(stmt, globals={"fn": fn, "x": x, "y": y, "k": k}).blocked_autorange(min_run_time=1)
            times[name] = t.median
        print(
            f"  {str(shape):18s} k={k}: box filters {times['box filters'] * 1e3:7.2f} ms, "
            f"unfold {times['unfold'] * 1e3:7.2f} ms, ratio unfold/box {times['unfold'] / times['box filters']:5.1f}x"
        )


if __name__ == "__main__":
    main()
