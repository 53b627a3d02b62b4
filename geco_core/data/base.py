"""In-memory image datasets and their batches.

Images are held decoded, as uint8 tensors ``(N, C, H, W)``, and batched by indexing: no per-sample
Python or PIL work during training. Pixels become floats in [0, 1] only on the way to the model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import attrs
import torch
from torch import Tensor

from geco_core.errors import ConfigError

__all__ = ["ImageData", "DataBatch", "Batches", "resolve_root"]


@attrs.frozen(eq=False)
class DataBatch:
    """A batch for the model: ``x`` float (B, C, H, W) in [0, 1]; labels, context and the
    examples' dataset ``index`` where there are any."""

    x: Tensor
    index: Tensor
    labels: Tensor | None = None
    context: Tensor | None = None


@attrs.frozen(eq=False)
class ImageData:
    """A dataset held in memory, or memory-mapped from a file.

    images:  uint8 ``(N, C, H, W)``
    labels:  int64 ``(N,)``, or ``(N, k)`` for stacked digits; None when the data has none
    context: uint8 ``(N, C', H, W)`` conditioning images of a conditional task; None otherwise
    rows:    for memory-mapped ``images`` (a data set larger than memory), which of their rows
             this data set holds, in order: subsets and splits then select rows instead of copying
             images, and batches read only the rows they need. None: every row, in memory.
    """

    images: Tensor
    labels: Tensor | None = None
    context: Tensor | None = None
    rows: Tensor | None = None

    def __attrs_post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        for name in ("labels", "context"):
            t = getattr(self, name)
            if t is not None and len(t) != len(self.images):
                raise ValueError(f"{name} has {len(t)} rows for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images) if self.rows is None else len(self.rows)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def context_shape(self) -> tuple[int, int, int] | None:
        return None if self.context is None else tuple(self.context.shape[1:])

    def to(self, device: torch.device | str) -> ImageData:
        """The same data on ``device`` (uint8 still): batches then index it there, with no copy
        from the host per step (memory-mapped data: its rows, read once)."""
        source = self if self.rows is None else self._map(lambda t: t[self.rows])
        return source._map(lambda t: t.to(device))

    def subset(self, index: Tensor) -> ImageData:
        """The examples at ``index`` as a dataset of their own (copies; for memory-mapped data, the
        same file with those rows)."""
        if self.rows is not None:
            return attrs.evolve(self, rows=self.rows[index])
        return self._map(lambda t: t[index].contiguous())

    def _map(self, fn: Callable[[Tensor], Tensor]) -> ImageData:
        images, labels, context = (None if t is None else fn(t) for t in (self.images, self.labels, self.context))
        return ImageData(images=images, labels=labels, context=context)

    def split(self, n: int, seed: int) -> tuple[ImageData, ImageData]:
        """``(rest, held)``: ``n`` examples drawn by ``seed`` held out of this dataset (a
        validation split carved from a training set), the others in their original order."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        held = order[:n].sort().values
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[held] = False
        return self.subset(keep.nonzero().squeeze(1)), self.subset(held)

    def mean_image(self, batch_size: int = 10_000) -> Tensor:
        """The mean image ``(C, H, W)``, pixels in [0, 1] (summed in float64, a block of rows at a time)."""
        total = torch.zeros(self.image_shape, dtype=torch.float64)
        for start in range(0, len(self), batch_size):
            total += self.batch(torch.arange(start, min(start + batch_size, len(self)))).x.double().sum(0)
        return (total / max(len(self), 1)).float()

    def batch(self, index: Tensor, device: torch.device | str = "cpu") -> DataBatch:
        """The examples at ``index``, moved to ``device`` as uint8 and scaled there to [0, 1]."""

        rows = index if self.rows is None else self.rows[index.cpu()]

        def pixels(t: Tensor) -> Tensor:
            return t[rows].to(device, non_blocking=True).float().div_(255.0)

        return DataBatch(
            x=pixels(self.images),
            index=index.to(device),
            labels=None if self.labels is None else self.labels[rows].to(device),
            context=None if self.context is None else pixels(self.context),
        )


@attrs.frozen
class Batches:
    """Which examples make up training batch ``step``: epoch ``e`` is a permutation drawn from
    ``seed`` and ``e``, cut into ``len // batch_size`` full batches, on ``device`` (moved there once
    per epoch). Stateless, so resuming at a step reproduces the exact order without saving any
    sampler state."""

    size: int
    batch_size: int
    seed: int
    device: str = "cpu"

    def __attrs_post_init__(self) -> None:
        if self.batch_size > self.size:
            raise ConfigError(f"train.batch_size ({self.batch_size}) is larger than the dataset ({self.size})")

    @property
    def per_epoch(self) -> int:
        return self.size // self.batch_size

    def __call__(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.per_epoch)
        return _permutation(self.size, self.seed, epoch, self.device)[i * self.batch_size : (i + 1) * self.batch_size]


@functools.lru_cache(maxsize=2)
def _permutation(size: int, seed: int, epoch: int, device: str) -> Tensor:
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order.to(device)


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$GECO_DATA``, else the user cache
    (``$XDG_CACHE_HOME/geco`` or ``~/.cache/geco``)."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("GECO_DATA"):
        return Path(os.environ["GECO_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "geco"
