"""Train the CLA digit classifier on the real MNIST files and write its weights (safetensors).

    python -m geco_cla.train --data ../shared/data --out plugins/geco_cla/geco_cla/mnist_classifier.safetensors

Adam with a one-cycle learning rate, batches of 128, random shifts of up to 2 pixels and rotations of
up to 10 degrees; ``--recipe`` trains on noisy or adversarial inputs (``geco_cla.robust``). Reports
the clean test accuracy, the accuracy under a 40-step PGD attack at ``--attack-eps`` (default: the
training eps of an adversarial recipe, in its norm -- L2 for ``pgd-l2``; L-inf 0.3 otherwise) and
the file's sha256 (to record in ``network.py``). FGSM-RS trains on all but 1000 training digits and
keeps the epoch whose PGD-10 accuracy on those 1000 is best: it can overfit catastrophically (robust
one epoch, not the next), and Wong et al. 2020 stop early the same way.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F

from geco_cla.network import DigitClassifier
from geco_cla.robust import RECIPES, non_digits, perturbation, robust_accuracy
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
    from geco_core.training import accuracy, train_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="data root with MNIST/raw/ (default: $GECO_DATA)")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=6, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--no-augment", action="store_true", help="no random rotations and shifts")
    parser.add_argument("--recipe", default="standard", choices=RECIPES, help="training inputs (default: %(default)s)")
    parser.add_argument(
        "--eps",
        type=float,
        default=0.3,
        help="L-inf radius (L2 for pgd-l2) or noise std, pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--pgd-steps", type=int, default=7, help="attack steps of the pgd and pgd-l2 recipes (default: %(default)s)"
    )
    parser.add_argument(
        "--reject", action="store_true", help="an eleventh class, not a digit, trained on geco_cla.robust.non_digits"
    )
    parser.add_argument("--pgd-eval", type=int, default=10000, help="test images attacked by PGD-40 (default: all)")
    parser.add_argument(
        "--attack-eps", type=float, help="radius of PGD-40 (default: the training eps; L-inf 0.3 for standard, noise)"
    )
    args = parser.parse_args()
    adversarial = args.recipe in ("fgsm-rs", "pgd", "pgd-l2")
    attack_eps = args.attack_eps or (args.eps if adversarial else 0.3)
    norm = "l2" if args.recipe == "pgd-l2" else "linf"  # the norm the recipe trains robustness in
    torch.manual_seed(args.seed)
    train = create("dataset", args.dataset, root=args.data, split="train", download=False)
    test = create("dataset", args.dataset, root=args.data, split="test", download=False)
    model = DigitClassifier(classes=11 if args.reject else 10)
    best = {"epoch": 0, "pgd10": -1.0, "state": None}
    keep_best = None
    if args.recipe == "fgsm-rs":  # keep the epoch most robust on held-out training digits
        train, held = train.split(1000, args.seed)

        def keep_best(epoch: int) -> None:
            pgd10 = robust_accuracy(model, held.images, held.labels, args.eps, steps=10)
            print(f"  PGD-10 accuracy at eps {args.eps} on 1000 held-out training digits: {pgd10:.4f}", flush=True)
            if pgd10 > best["pgd10"]:
                best.update(epoch=epoch, pgd10=pgd10, state=copy.deepcopy(model.state_dict()))

    acc = train_classifier(
        model,
        train,
        test,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        augment=None if args.no_augment else augment,
        perturb=perturbation(args.recipe, args.eps, args.pgd_steps),
        mix=non_digits if args.reject else None,
        on_epoch=keep_best,
        log=lambda line: print(line, flush=True),
    )
    if best["state"] is not None and best["epoch"] != args.epochs:
        model.load_state_dict(best["state"])
        acc = accuracy(model, test)
        print(f"kept epoch {best['epoch']} (the most robust): test accuracy {acc:.4%}", flush=True)
    n = min(args.pgd_eval, len(test))
    robust = robust_accuracy(model, test.images[:n], test.labels[:n], attack_eps, norm=norm) if n else float("nan")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {
        "dataset": args.dataset,
        "test_accuracy": f"{acc:.4f}",
        "pgd40_accuracy": f"{robust:.4f}",
        "pgd40_images": str(n),
        "recipe": args.recipe,
        "augment": str(not args.no_augment),
        "eps": str(args.eps),
        "pgd40_eps": str(attack_eps),
        "pgd40_norm": norm,
        "epochs": str(args.epochs),
        "kept_epoch": str(best["epoch"] or args.epochs),
        "seed": str(args.seed),
        "classes": str(11 if args.reject else 10),
    }
    save_file(state, args.out, metadata=meta)
    print(
        f"wrote {args.out}: {sum(v.numel() for v in state.values())} values, test accuracy {acc:.4%}, "
        f"PGD-40 accuracy at {norm} eps {attack_eps} {robust:.4%} ({n} images), sha256 {sha256(args.out)}"
    )


if __name__ == "__main__":
    main()
