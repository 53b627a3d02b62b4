"""How GECO's alpha and step size shape convergence: the quickstart config (conv VAE on shapes,
RE kappa = 0.1) trained with each (alpha, lr) for the same number of steps.

    .venv/bin/python benchmarks/convergence.py [--steps 3000] [--settings 0.99,1 0.9,1 0.9,3 0.99,3]

Reports, per setting: the first step from which the running RMSE (from c_ma) stays within 10% of
kappa, the largest lambda reached, and the final reached RMSE, held-out RMSE and KL.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from geco_core.training import Run, train
from geco_core.training.config import load_config

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.toml"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--settings", nargs="+", default=["0.99,1", "0.9,1", "0.9,3", "0.99,3"])
    args = parser.parse_args()
    header = ("alpha", "lr", "within 10% from", "max lambda", "reached", "held-out", "KL")
    print("{:>5} {:>4}  {:>15}  {:>10}  {:>7}  {:>8}  {:>6}".format(*header))
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            alpha, lr = (float(v) for v in setting.split(","))
            sets = [
                f"objective.geco.alpha={alpha}",
                f"objective.geco.lr={lr}",
                f"train.steps={args.steps}",
                f"logging.dir='{tmp}'",
                "logging.progress=false",
                "logging.plots=false",
                "logging.tensorboard=false",
            ]
            run = train(config=load_config(args.config, sets))
            metrics = Run.open(run).read_metrics()
            kappa = next(c["kappa"] for c in json.loads((run / "summary.json").read_text())["constraints"])
            ratio = [m["re/reached"] / kappa for m in metrics]
            settle = next(
                (metrics[i]["step"] for i in range(len(ratio)) if all(abs(r - 1) <= 0.1 for r in ratio[i:])), None
            )
            held = json.loads((run / "summary.json").read_text())["heldout"]
            print(
                f"{alpha:5.2f} {lr:4g}  {settle if settle is not None else 'never':>15}  "
                f"{max(m['re/lambda'] for m in metrics):10.3g}  {metrics[-1]['re/reached']:7.4f}  "
                f"{held['rmse']:8.4f}  {held['kl']:6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
