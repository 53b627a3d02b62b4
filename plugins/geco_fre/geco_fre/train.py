"""Train the FRE feature network: a timm ResNet classifier on real data, of which only the early
stages are written (safetensors, with arch, input channels, normalisation and accuracy as metadata).

    python -m geco_fre.train --data ../shared/data --out plugins/geco_fre/geco_fre/fashion_resnet18_stages.safetensors

Defaults: ``resnet18`` with one input channel, Fashion-MNIST, Adam with a one-cycle learning rate,
batches of 128, random shifts of up to 2 pixels and horizontal flips (not for MNIST). Reports the test accuracy and
the file's sha256 (to record in ``network.py``). Only the kept stages are written, so the
classifier's accuracy cannot be re-checked from the file; the accuracy of a nearest-class-mean probe
on the kept stages' pooled features is recorded too, and tests re-evaluate that.
``--dataset cifar10`` trains a three-channel one where CIFAR-10 is present.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from geco_core import create
from geco_core.compat import import_timm
from geco_core.training import train_classifier
from geco_core.weights import sha256
from geco_fre.network import build_feature_network, probe_accuracy

STEM = ("conv1.", "bn1.")
LAYERS = ("layer1.", "layer2.", "layer3.", "layer4.")


def shift_and_flip(x: torch.Tensor, g: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Per-example random shift of up to 2 pixels (zero padding) and, if ``flip``, a horizontal flip
    half the time (not for digits)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        flipped = torch.rand(n, generator=g) < 0.5
        out[flipped] = out[flipped].flip(-1)
    return out


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="data root (default: $GECO_DATA)")
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist", "cifar10"])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--keep", type=int, default=1, help="keep the stem and layers 1..KEEP (stages 0..KEEP)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train = create("dataset", args.dataset, root=args.data, split="train", download=False)
    test = create("dataset", args.dataset, root=args.data, split="test", download=False)
    pixels = train.images.float() / 255
    mean, std = pixels.mean().item(), pixels.std().item()
    in_chans = train.images.shape[1]
    model = import_timm().create_model(args.arch, num_classes=10, in_chans=in_chans)
    acc = train_classifier(
        model,
        train,
        test,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        augment=lambda x, g: shift_and_flip(x, g, flip=args.dataset != "mnist"),
        preprocess=lambda x: (x - mean) / std,
        log=lambda line: print(line, flush=True),
    )
    kept = STEM + LAYERS[: args.keep]
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(kept)}
    meta = {
        "arch": args.arch,
        "dataset": args.dataset,
        "stages": ",".join(map(str, range(args.keep + 1))),
        "mean": f"{mean:.6f}",
        "std": f"{std:.6f}",
        "test_accuracy": f"{acc:.4f}",
        "epochs": str(args.epochs),
        "seed": str(args.seed),
    }
    save_file(state, args.out, metadata=meta)
    probe = probe_accuracy(build_feature_network(args.out, args.arch, tuple(range(args.keep + 1))), train, test)
    save_file(state, args.out, metadata={**meta, "probe_accuracy": f"{probe:.4f}"})
    print(
        f"wrote {args.out}: stages 0..{args.keep}, {sum(v.numel() for v in state.values())} values, "
        f"classifier test accuracy {acc:.4%}, nearest-class-mean probe on the kept stages {probe:.4%}, "
        f"sha256 {sha256(args.out)}"
    )


if __name__ == "__main__":
    main()
