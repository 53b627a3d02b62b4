"""Training speed of every model: images per second of a full training step (forward, backward, Adam)
with the ELBO objective, batch 64, per model and image size.

    .venv/bin/python benchmarks/bench_models.py [--batch 64] [--min-run-time 2]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from geco_core import create
from geco_core.data.base import DataBatch
from geco_core.training.objectives import ELBO

MODELS = ["mlp-vae", "conv-vae", "vae-nvp", "convdraw", "conditional-convdraw"]
SHAPES = [(1, 28, 28), (3, 28, 28), (3, 32, 32)]


def make_step(model, objective, opt, batch: DataBatch):
    def step() -> None:
        loss = objective(model(batch.x, batch.context), batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}; images/s of a training step")
    print(
        "{:22s}".format("model") + "".join(f"{'x'.join(map(str, s)):>12s}" for s in SHAPES) + "   parameters (1x28x28)"
    )
    for name in args.models:
        row, params = [], None
        for shape in SHAPES:
            torch.manual_seed(0)
            conditional = name.startswith("conditional")
            kwargs = {"context_shape": (2, *shape[1:])} if conditional else {}
            model = create("model", name, image_shape=shape, **kwargs).to(device)
            params = params or sum(p.numel() for p in model.parameters())
            objective = ELBO().to(device)
            opt = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=1e-3)
            x = torch.rand(args.batch, *shape, device=device)
            ctx = torch.rand(args.batch, 2, *shape[1:], device=device) if conditional else None
            step = make_step(model, objective, opt, DataBatch(x=x, index=torch.arange(args.batch), context=ctx))
            t = benchmark.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=args.min_run_time)
            row.append(args.batch / t.median)
        print(f"{name:22s}" + "".join(f"{v:12,.0f}" for v in row) + f"   {params:,}")


if __name__ == "__main__":
    main()
