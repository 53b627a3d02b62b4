"""``shapes``: procedurally generated images that need no files, the embedded default dataset.

Each image holds ``1..max_shapes`` filled shapes (circle, square, triangle) at a random position,
scale, rotation and colour on a black background, drawn with anti-aliased edges and composed back
to front. Everything is drawn from one ``torch.Generator`` seeded by ``seed`` and the split, so the
same arguments give the same images on every machine.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from geco_core.data.base import ImageData
from geco_core.errors import ConfigError

__all__ = ["shapes", "KINDS"]

KINDS = ("circle", "square", "triangle")
SPLITS = {"train": 0, "test": 1}
_TRIANGLE_NORMALS = torch.tensor([[math.cos(a), math.sin(a)] for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)])


def shapes(
    split: str = "train",
    seed: int = 0,
    n: int | None = None,
    size: int = 32,
    channels: int = 3,
    max_shapes: int = 2,
) -> ImageData:
    """Procedural shapes (circles, squares, triangles), needing no files; the default dataset.

    Images ``channels`` x ``size`` x ``size``; label = kind of the top shape (0 circle, 1 square,
    2 triangle). ``n`` defaults to 10000 for train and 2000 for test."""
    if split not in SPLITS:
        raise ConfigError(f"data.split must be one of {', '.join(SPLITS)}; got {split!r}")
    n = (10_000 if split == "train" else 2_000) if n is None else n
    for key, value, low in (("n", n, 1), ("size", size, 8), ("max_shapes", max_shapes, 1)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"data.{key} must be an integer >= {low}, got {value!r}")
    if channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {channels!r}")
    g = torch.Generator().manual_seed(seed * len(SPLITS) + SPLITS[split])
    images = torch.empty(n, channels, size, size, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    for start in range(0, n, 1024):  # bounded memory: (chunk, shapes, size, size) floats
        stop = min(n, start + 1024)
        images[start:stop], labels[start:stop] = _draw(stop - start, size, channels, max_shapes, g)
    return ImageData(images=images, labels=labels)


def _draw(n: int, size: int, channels: int, max_shapes: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(n, max_shapes, *shape, generator=g)

    count = torch.randint(1, max_shapes + 1, (n,), generator=g)
    kind = torch.randint(len(KINDS), (n, max_shapes), generator=g)
    centre = uniform(0.25, 0.75, 2) * size
    radius = uniform(0.15, 0.35) * size
    angle = uniform(0.0, 2 * math.pi)
    colour = uniform(0.35, 1.0, channels)

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    py, px = torch.meshgrid(coords, coords, indexing="ij")  # (size, size), pixel centres
    dx = px - centre[..., 0, None, None]  # (n, S, size, size)
    dy = py - centre[..., 1, None, None]
    cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
    r = radius[..., None, None]
    u, v = (cos * dx + sin * dy) / r, (-sin * dx + cos * dy) / r  # shape frame, unit size
    # signed distances in units of the radius (< 0 inside)
    circle = torch.sqrt(u * u + v * v) - 1.0
    square = torch.maximum(u.abs(), v.abs()) - 0.8
    triangle = torch.stack([nx * u + ny * v for nx, ny in _TRIANGLE_NORMALS.tolist()]).amax(0) - 0.5
    distance = torch.where(
        kind[..., None, None] == 0, circle, torch.where(kind[..., None, None] == 1, square, triangle)
    )
    alpha = torch.sigmoid(-distance * r * 2.0)  # about one pixel of anti-aliasing
    alpha = alpha * (torch.arange(max_shapes) < count[:, None])[..., None, None]

    canvas = torch.zeros(n, channels, size, size)
    for s in range(max_shapes):  # back to front
        a = alpha[:, s, None]
        canvas = canvas * (1 - a) + colour[:, s, :, None, None] * a
    top = (count - 1).unsqueeze(1)
    return (canvas * 255).round_().to(torch.uint8), kind.gather(1, top).squeeze(1)
