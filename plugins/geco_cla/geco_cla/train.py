"""Train the CLA digit classifier on the real MNIST files and write its weights (safetensors).

    python -m geco_cla.train --data ../shared/data --out plugins/geco_cla/geco_cla/mnist_classifier.safetensors

Adam with a one-cycle learning rate, batches of 128, random shifts of up to 2 pixels and rotations of
up to 10 degrees; reports the test accuracy and the file's sha256 (to record in ``network.py``).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from geco_cla.network import DigitClassifier
from geco_core.weights import sha256


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-example random rotation (+-10 degrees) and shift (+-2 pixels), one affine grid per image."""
    n = len(x)
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(10)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 / 14)  # grid units: 2 px of 28
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def main() -> None:
    from safetensors.torch import save_file

    from geco_core import create
    from geco_core.training import train_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="data root with MNIST/raw/ (default: $GECO_DATA)")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train = create("dataset", args.dataset, root=args.data, split="train", download=False)
    test = create("dataset", args.dataset, root=args.data, split="test", download=False)
    model = DigitClassifier()
    acc = train_classifier(
        model,
        train,
        test,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        augment=augment,
        log=lambda line: print(line, flush=True),
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"dataset": args.dataset, "test_accuracy": f"{acc:.4f}", "epochs": str(args.epochs), "seed": str(args.seed)}
    save_file(state, args.out, metadata=meta)
    print(
        f"wrote {args.out}: {sum(v.numel() for v in state.values())} values, test accuracy {acc:.4%}, "
        f"sha256 {sha256(args.out)}"
    )


if __name__ == "__main__":
    main()
