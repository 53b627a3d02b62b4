"""MNIST, Fashion-MNIST and the paper's sets derived from MNIST (section 4).

The original idx ``.gz`` files are read with gzip and numpy, once per process, straight into uint8
tensors. They live under the data root in torchvision's layout (``MNIST/raw/``, ``FashionMNIST/raw/``),
so a folder prepared for torchvision works here too. Derived sets are drawn deterministically from
MNIST and a seed.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import attrs
import torch
from torch import Tensor

from geco_core.data.base import ImageData, resolve_root
from geco_core.errors import ConfigError, DataError

__all__ = [
    "IdxSet",
    "MNIST",
    "FASHION_MNIST",
    "mnist",
    "fashion_mnist",
    "color_mnist",
    "mnist_triplets",
    "mnist_sum",
    "mnist_sumhard",
    "mnist_rotate",
    "triplets",
    "rotate_triplets",
    "of_class",
    "split_generator",
]

SPLITS = ("train", "test")


@attrs.frozen
class IdxSet:
    """Where an idx dataset lives under the data root, its files (with md5s) and download mirrors."""

    name: str
    folder: str
    files: dict[str, str]
    mirrors: tuple[str, ...]

    def prefix(self, split: str) -> str:
        if split not in SPLITS:
            raise ConfigError(f"data.split must be one of {', '.join(SPLITS)}; got {split!r}")
        return "train" if split == "train" else "t10k"

    def load(self, root: str | Path | None, split: str, download: bool) -> ImageData:
        """Images (N, 1, 28, 28) uint8 and labels (N,) int64 of ``split``."""
        raw = resolve_root(root) / self.folder
        self.ensure(raw, download)
        p = self.prefix(split)
        images = _read_idx(raw / f"{p}-images-idx3-ubyte.gz")
        labels = _read_idx(raw / f"{p}-labels-idx1-ubyte.gz")
        return ImageData(images=images.unsqueeze(1), labels=labels.long())

    def ensure(self, raw: Path, download: bool) -> None:
        """Download missing files where the network allows; otherwise say which go where."""
        missing = [f for f in self.files if not (raw / f).is_file()]
        reason = "downloading is off (data.download = false)"
        if missing and download:
            from geco_core.compat import import_torchvision

            torchvision = import_torchvision()
            created = [p for p in (raw, *raw.parents) if not p.exists()]  # deepest first
            for f in missing:
                for mirror in self.mirrors:
                    try:
                        torchvision.datasets.utils.download_url(mirror + f, str(raw), f, self.files[f])
                        break
                    except Exception as exc:  # noqa: BLE001 - any failure means: try the next mirror
                        reason = f"download failed: {type(exc).__name__}: {exc}".splitlines()[0]
                        (raw / f).unlink(missing_ok=True)  # a partial or corrupt file is not data
            missing = [f for f in self.files if not (raw / f).is_file()]
            for folder in created:  # a failed download leaves no empty folders behind
                if missing and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        if missing:
            raise DataError(
                f"{self.name}: missing {', '.join(missing)} in {raw} ({reason}). Put the original idx .gz "
                f"files there, or point data.root or $GECO_DATA at a folder that has {self.folder}/"
            )


MNIST = IdxSet(
    "mnist",
    "MNIST/raw",
    {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
)
FASHION_MNIST = IdxSet(
    "fashion-mnist",
    "FashionMNIST/raw",
    {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
)


def _read_idx(path: Path) -> Tensor:
    """Decode an idx file (big-endian header: magic 0x0000080N, N sizes; then uint8 data)."""
    stat = path.stat()
    return _read_idx_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> Tensor:
    try:
        with gzip.open(path, "rb") as f:
            data = bytearray(f.read())
        magic = int.from_bytes(data[:4], "big")
        if magic >> 8 != 0x08:
            raise ValueError(f"magic number {magic:#x} is not that of an idx uint8 file")
        ndim = magic & 0xFF
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        array = torch.frombuffer(data, dtype=torch.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, RuntimeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    return array.clone()


def mnist(root: str | None = None, split: str = "train", download: bool = True) -> ImageData:
    """MNIST digits, 1x28x28, labels 0-9 (LeCun et al. 1998)."""
    return MNIST.load(root, split, download)


def fashion_mnist(root: str | None = None, split: str = "train", download: bool = True) -> ImageData:
    """Fashion-MNIST, 1x28x28, labels 0-9 (Xiao et al. 2017)."""
    return FASHION_MNIST.load(root, split, download)


def _check_size(n: int | None, default: int) -> int:
    n = default if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"data.n must be a positive integer, got {n!r}")
    return n


def color_mnist(
    root: str | None = None, split: str = "train", seed: int = 0, n: int | None = None, download: bool = True
) -> ImageData:
    """Color-MNIST: three random MNIST digits as the R, G, B channels, 3x28x28 (Metz et al. 2017).

    Labels (N, 3); ``n`` defaults to the size of the MNIST split."""
    base = MNIST.load(root, split, download)
    n = _check_size(n, len(base))
    g = torch.Generator().manual_seed(seed * 2 + SPLITS.index(split))
    idx = torch.randint(len(base), (n, 3), generator=g)
    return ImageData(images=base.images[idx, 0], labels=base.labels[idx])


def triplets(labels: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Indices ``(n, 3)`` of digit triplets with ``l2 = (l0 + l1) mod 10``: I0 and I1 uniform, I2
    uniform among the digits of class ``l2``."""
    i01 = torch.randint(len(labels), (n, 2), generator=generator)
    l2 = labels[i01].sum(1) % 10
    return torch.cat([i01, of_class(labels, l2, generator).unsqueeze(1)], dim=1)


def of_class(labels: Tensor, classes: Tensor, generator: torch.Generator, exclude: Tensor | None = None) -> Tensor:
    """One uniformly drawn index of class ``classes[i]`` for each ``i`` (other than ``exclude[i]``,
    which must be of that class, when given)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=10)
    starts = torch.cumsum(counts, 0) - counts
    u = torch.rand(len(classes), generator=generator, dtype=torch.float64)
    if exclude is None:
        pick = (u * counts[classes]).long().clamp_max(counts[classes] - 1)
        return order[starts[classes] + pick]
    # draw among the other count - 1 members, then step over the excluded one
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    skip = rank[exclude] - starts[classes]
    pick = (u * (counts[classes] - 1)).long().clamp_max(counts[classes] - 2)
    return order[starts[classes] + pick + (pick >= skip).long()]


def mnist_triplets(
    root: str | None = None, split: str = "train", seed: int = 0, n: int | None = None, download: bool = True
) -> ImageData:
    """MNIST-triplets: digits (I0, I1, I2) with l2 = (l0 + l1) mod 10, as channels of a 3x28x28 image.

    Modelled jointly (the paper's section 4); labels (N, 3); ``n`` defaults to the split's size."""
    base = MNIST.load(root, split, download)
    n = _check_size(n, len(base))
    g = torch.Generator().manual_seed(seed * 2 + SPLITS.index(split))
    idx = triplets(base.labels, n, g)
    return ImageData(images=base.images[idx, 0], labels=base.labels[idx])


# --- the paper's conditional tasks (section 4): contexts and targets from digit triplets -----------


def split_generator(seed: int, split: str) -> torch.Generator:
    """The generator a derived set of ``split`` is drawn with: the two splits never share draws."""
    return torch.Generator().manual_seed(seed * 2 + SPLITS.index(split))


def mnist_sum(
    root: str | None = None, split: str = "train", seed: int = 0, n: int | None = None, download: bool = True
) -> ImageData:
    """MNIST-sum: context (I0, I1), target I2 with l2 = (l0 + l1) mod 10 (conditional).

    Context 2x28x28, target 1x28x28, labels (N,) = l2, the target's class."""
    base = MNIST.load(root, split, download)
    idx = triplets(base.labels, _check_size(n, len(base)), split_generator(seed, split))
    return ImageData(images=base.images[idx[:, 2]], labels=base.labels[idx[:, 2]], context=base.images[idx[:, :2], 0])


def mnist_sumhard(
    root: str | None = None, split: str = "train", seed: int = 0, n: int | None = None, download: bool = True
) -> ImageData:
    """MNIST-sumhard: context I2, targets (I0, I1) with l2 = (l0 + l1) mod 10 (conditional).

    Context 1x28x28, target 2x28x28 (the two digits as channels), labels (N, 2) = (l0, l1)."""
    base = MNIST.load(root, split, download)
    idx = triplets(base.labels, _check_size(n, len(base)), split_generator(seed, split))
    return ImageData(images=base.images[idx[:, :2], 0], labels=base.labels[idx[:, :2]], context=base.images[idx[:, 2]])


def rotate_triplets(labels: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Indices ``(n, 3)``: I0 and I1 uniform, I2 another instance of class l0 (never I0 itself)."""
    i01 = torch.randint(len(labels), (n, 2), generator=generator)
    l0 = labels[i01[:, 0]]
    return torch.cat([i01, of_class(labels, l0, generator, exclude=i01[:, 0]).unsqueeze(1)], dim=1)


def mnist_rotate(
    root: str | None = None, split: str = "train", seed: int = 0, n: int | None = None, download: bool = True
) -> ImageData:
    """MNIST-rotate: context (I0, I1), target I2 of class l0 rotated by l1 * 30 degrees (conditional).

    I2 is a different instance of l0's class than I0. Rotation counter-clockwise about the centre,
    bilinear, black outside. Context 2x28x28, target 1x28x28, labels (N,) = l0."""
    from geco_core.compat import import_torchvision

    torchvision = import_torchvision()

    base = MNIST.load(root, split, download)
    idx = rotate_triplets(base.labels, _check_size(n, len(base)), split_generator(seed, split))
    angle = base.labels[idx[:, 1]]
    target = base.images[idx[:, 2]].clone()
    for k in range(10):  # one rotation per angle, each on all its images at once
        sel = angle == k
        if sel.any() and k:
            target[sel] = torchvision.transforms.functional.rotate(
                target[sel], 30.0 * k, interpolation=torchvision.transforms.InterpolationMode.BILINEAR
            )
    return ImageData(images=target, labels=base.labels[idx[:, 0]], context=base.images[idx[:, :2], 0])
