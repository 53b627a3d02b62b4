"""Cost of GECO in a training step: the same conv VAE, batch and Adam step with a plain ELBO-style
loss (Gaussian NLL + KL) and with GECO + RE (KL + lambda * C). Reports the ratio of median step times.

    .venv/bin/python benchmarks/bench_step.py [--shape 3 32 32] [--batch 64] [--rounds 5]

GECO's own work per step is a handful of (L,)-vector operations, so the ratio should be close to 1.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
from torch.utils import benchmark

from geco_core import GECO, Batch, create, create_constraint


def make_step(loss_name: str, shape, batch: int, device: torch.device):
    torch.manual_seed(0)
    model = create("model", "conv-vae", image_shape=tuple(shape)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, *shape, device=device)
    geco = GECO([create_constraint("re", kappa=0.1)]).to(device)
    log_two_pi_sigma2 = math.log(2 * math.pi * 0.1**2)

    def step() -> None:
        out = model(x)
        if loss_name == "elbo":
            nll = 0.5 * ((x - out.x_hat).square() / 0.1**2 + log_two_pi_sigma2).flatten(1).sum(1)
            loss = (nll + out.kl).mean()
        else:
            loss = geco(out.kl, Batch(x, out.x_hat))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds per variant")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = {name: make_step(name, args.shape, args.batch, device) for name in ("elbo", "geco")}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):  # alternate (and swap the order), so drifts hit both variants alike
        for name, step in list(steps.items())[:: 1 if r % 2 == 0 else -1]:
            m = benchmark.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=args.min_run_time)
            times[name].append(m.median)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["geco"] / med["elbo"]
    print(f"device {device}, threads {torch.get_num_threads()}, conv-vae on {tuple(args.shape)}, batch {args.batch}")
    for name in steps:
        print(
            f"  {name:5s} step: median {med[name] * 1e3:7.2f} ms over {args.rounds} rounds "
            f"(min {min(times[name]) * 1e3:.2f}, max {max(times[name]) * 1e3:.2f})"
        )
    print(f"  ratio geco / elbo: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "median_s": med, "ratio": ratio, "rounds": times}, f, indent=2)


if __name__ == "__main__":
    main()
