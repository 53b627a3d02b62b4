"""CIFAR-10 and CelebA through torchvision, when their files are present (or can be downloaded).

They are decoded once into uint8 tensors like every other dataset. CelebA is centre-cropped to
148x148 and resized to 64x64 (the usual VAE preprocessing); the result is cached next to the files
as ``celeba/geco-64x64-<split>.pt`` (a plain tensor file, loaded with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from geco_core.data.base import ImageData, resolve_root
from geco_core.errors import ConfigError, DataError

__all__ = ["cifar10", "celeba"]


def cifar10(root: str | None = None, split: str = "train", download: bool = True) -> ImageData:
    """CIFAR-10, 3x32x32, labels 0-9 (Krizhevsky 2009)."""
    from geco_core.compat import import_torchvision

    torchvision = import_torchvision()

    if split not in ("train", "test"):
        raise ConfigError(f"data.split must be train or test; got {split!r}")
    path = resolve_root(root)
    try:
        ds = torchvision.datasets.CIFAR10(str(path), train=split == "train", download=download)
    except Exception as exc:  # noqa: BLE001 - torchvision raises RuntimeError or URLError
        raise DataError(
            f"cifar10: cannot load from {path} ({type(exc).__name__}: {exc}). Put cifar-10-python.tar.gz "
            f"(or its extracted cifar-10-batches-py/) in {path}, or point data.root or $GECO_DATA there"
        ) from None
    images = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageData(images=images, labels=torch.tensor(ds.targets, dtype=torch.long))


def celeba(root: str | None = None, split: str = "train", download: bool = False) -> ImageData:
    """CelebA faces, centre-cropped and resized to 3x64x64 (Liu et al. 2015); no labels."""
    from geco_core.compat import import_torchvision

    torchvision = import_torchvision()

    if split not in ("train", "valid", "test"):
        raise ConfigError(f"data.split must be train, valid or test; got {split!r}")
    path = resolve_root(root)
    cache = path / "celeba" / f"geco-64x64-{split}.pt"
    if cache.is_file():
        return ImageData(images=torch.load(cache, weights_only=True))
    T = torchvision.transforms
    transform = T.Compose([T.CenterCrop(148), T.Resize(64), T.PILToTensor()])
    try:
        ds = torchvision.datasets.CelebA(str(path), split=split, target_type=[], transform=transform, download=download)
    except Exception as exc:  # noqa: BLE001
        raise DataError(
            f"celeba: cannot load from {path} ({type(exc).__name__}: {exc}). Put img_align_celeba/ and "
            f"list_eval_partition.txt (with the other CelebA .txt files) in {Path(path) / 'celeba'}"
        ) from None
    from tqdm import tqdm

    images = torch.stack([ds[i][0] for i in tqdm(range(len(ds)), desc=f"celeba {split}: decoding once")])
    torch.save(images, cache.with_suffix(".tmp"))
    cache.with_suffix(".tmp").replace(cache)
    return ImageData(images=images)
