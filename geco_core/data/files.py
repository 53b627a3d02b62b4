"""Your images: ``data.name = "folder"`` (a directory of PNG/JPEG files) and ``data.name = "tensor"``
(a NumPy ``.npy`` or torch ``.pt`` file), decoded once into a cache and trained from there.

A folder's images are read with Pillow, converted to grayscale or RGB (``channels``; by default RGB
unless every image is grayscale), and brought to ``size`` (``fit = "resize"`` stretches,
``"crop"`` cuts the largest centred square first); without ``size`` every image must have the
same size. Sub-folders are classes: their sorted names become labels 0, 1, ... (images directly in
the folder then are refused; a folder of images alone has no labels).

The decoded images are written once, one image at a time, as raw uint8 ``(N, C, H, W)``
(``<name>.u8`` with its shape in JSON) into ``.geco-cache`` beside the data, or under the data root
where that folder cannot be written; the cache is keyed by the files (names, sizes, times) and the
options, so a second run starts at once and a changed folder is decoded again. ``memory_map =
true`` trains from that file memory-mapped, reading only the rows of each batch (a data set larger
than memory); otherwise it is read whole into memory. The ``test`` split is a fixed
``test_fraction`` of the examples drawn by ``seed``; ``train`` the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import BinaryIO

import torch

from geco_core.data.base import ImageData, resolve_root
from geco_core.errors import ConfigError, DataError

__all__ = ["folder", "tensor_file", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FITS = ("resize", "crop")


def folder(
    path: str,
    split: str = "train",
    seed: int = 0,
    size: int | list[int] | None = None,
    fit: str = "resize",
    channels: int | None = None,
    test_fraction: float = 0.1,
    memory_map: bool = False,
    root: str | None = None,
) -> ImageData:
    """The images under ``path`` (module docstring); ``size``: an int (square) or ``[H, W]``."""
    base = _existing(path)
    if fit not in FITS:
        raise ConfigError(f"data.fit must be one of {', '.join(FITS)}, got {fit!r}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {channels!r}")
    files, labels, classes = _listing(base)
    hw = _size(size)
    stamp = [(str(f.relative_to(base)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = _key({"files": stamp, "size": hw, "fit": fit, "channels": channels})

    images = _cached(base, key, lambda sink: _decode(files, hw, fit, channels, sink), memory_map, root)
    label_tensor = torch.tensor(labels, dtype=torch.int64) if classes else None
    return _split(images, label_tensor, split, seed, test_fraction, memory_map)


def tensor_file(
    path: str, split: str = "train", seed: int = 0, test_fraction: float = 0.1, memory_map: bool = False
) -> ImageData:
    """Images in a ``.npy`` or ``.pt`` file: uint8 ``(N, C, H, W)`` or ``(N, H, W)``, or floats in
    [0, 1] (made uint8); a ``.pt`` file may hold a dict with ``images`` and ``labels``."""
    file = _existing(path)
    labels = None
    if file.suffix == ".npy":
        import numpy as np

        try:  # memory-mapped copy-on-write: rows are read when a batch needs them
            array = np.load(file, mmap_mode="c" if memory_map else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"data.path: cannot read {file} as a NumPy array ({exc})") from None
        images = torch.from_numpy(array)
    elif file.suffix == ".pt":
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: one line naming it
            raise DataError(f"data.path: cannot read {file} as a torch file ({str(exc).splitlines()[0]})") from None
        images = loaded.get("images") if isinstance(loaded, dict) else loaded
        labels = loaded.get("labels") if isinstance(loaded, dict) else None
        if not isinstance(images, torch.Tensor):
            raise DataError(f"data.path: {file} holds no tensor of images (a tensor, or a dict with 'images')")
    else:
        raise ConfigError(f"data.path must be a .npy or .pt file, got {file.name!r}")
    images = _as_uint8(images, file)
    return _split(images, labels, split, seed, test_fraction, memory_map)


def _existing(path: str | None) -> Path:
    if not path:
        raise ConfigError("data.path is required: the folder of images (or the .npy/.pt file) to train on")
    found = Path(path).expanduser()
    if not found.exists():
        raise DataError(f"data.path: {found} does not exist")
    return found


def _listing(base: Path) -> tuple[list[Path], list[int], list[str]]:
    """The image files under ``base`` (sorted) and their labels from class sub-folders."""
    if not base.is_dir():
        raise DataError(f"data.path: {base} is not a folder")
    top = sorted(p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    nested = {c: sorted(p for p in (base / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    classes = [c for c in classes if nested[c]]
    if top and classes:
        raise DataError(
            f"data.path: {top[0]} lies beside class folders ({', '.join(classes[:3])}): put every image in a class "
            "folder, or none"
        )
    if top:
        return top, [], []
    files = [f for c in classes for f in nested[c]]
    if not files:
        raise DataError(f"data.path: no {'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images in {base}")
    return files, [i for i, c in enumerate(classes) for _ in nested[c]], classes


def _size(size: int | list[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise ConfigError(f"data.size must be a positive int or [height, width], got {size!r}")
    return hw


def _decode(files: list[Path], hw: tuple[int, int] | None, fit: str, channels: int | None, sink: BinaryIO) -> tuple:
    """Every file as uint8 ``(C, H, W)`` rows written in turn to ``sink``, one image decoded at a
    time; returns the shape ``(N, C, H, W)``. One line naming a file that cannot be read, or whose
    size differs from the first's where no size is given."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    def opened(f: Path) -> Image.Image:
        try:
            return Image.open(f)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"data.path: cannot read image {f} ({str(exc).splitlines()[0]})") from None

    headers = []  # (mode, (width, height)) from each file's header, nothing decoded yet
    for f in files:
        with opened(f) as img:
            headers.append((img.mode, img.size))
    if channels is None:
        channels = 1 if all(mode in ("1", "L", "I;16", "I") for mode, _ in headers) else 3
    if hw is None:
        first = headers[0][1]
        for f, (_, size) in zip(files, headers):
            if size != first:
                raise DataError(
                    f"data.path: {f} is {size[0]}x{size[1]}, {files[0].name} {first[0]}x{first[1]}: "
                    "give data.size to bring them to one size"
                )
    for f in files:
        with opened(f) as img:
            try:
                img = img.convert("L" if channels == 1 else "RGB")
            except OSError as exc:
                raise DataError(f"data.path: cannot read image {f} ({str(exc).splitlines()[0]})") from None
        if hw is not None:
            if fit == "crop":
                side = min(img.size)
                left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
                img = img.crop((left, top, left + side, top + side))
            img = img.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels)
        sink.write(pixels.transpose(2, 0, 1).tobytes())
    height, width = hw if hw is not None else (headers[0][1][1], headers[0][1][0])
    return len(files), channels, height, width


def _key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _cached(base: Path, key: str, decode, memory_map: bool, root: str | None) -> torch.Tensor:
    """The decoded images from the cache, written first (``decode(sink)``, straight into the file)
    where missing: memory-mapped or read whole."""
    folders = (base / ".geco-cache", resolve_root(root) / "folder-cache" / _key({"path": str(base.resolve())}))
    for folder in folders:
        data, meta = folder / f"{key}.u8", folder / f"{key}.json"
        if data.is_file() and meta.is_file():
            return _load(data, json.loads(meta.read_text())["shape"], memory_map)
    for folder in folders:
        partial = folder / f"{key}.u8.partial"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            sink = open(partial, "wb")  # noqa: SIM115 - closed below
        except OSError:
            continue
        try:
            with sink:
                shape = decode(sink)
            os.replace(partial, folder / f"{key}.u8")
            (folder / f"{key}.json").write_text(json.dumps({"shape": list(shape)}))
        finally:
            partial.unlink(missing_ok=True)
        return _load(folder / f"{key}.u8", shape, memory_map)
    sink = io.BytesIO()  # no writable cache anywhere: decoded into memory, each run
    shape = decode(sink)
    return torch.frombuffer(bytearray(sink.getvalue()), dtype=torch.uint8).view(shape)


def _load(path: Path, shape, memory_map: bool) -> torch.Tensor:
    images = torch.from_file(str(path), shared=False, size=math.prod(shape), dtype=torch.uint8).view(tuple(shape))
    return images if memory_map else images.clone()


def _as_uint8(images: torch.Tensor, file: Path) -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4:
        raise DataError(f"data.path: {file} holds a {tuple(images.shape)} tensor; images are (N, C, H, W) or (N, H, W)")
    if images.dtype == torch.uint8:
        return images
    if images.is_floating_point() and float(images.min()) >= 0 and float(images.max()) <= 1:
        return (images * 255).round().to(torch.uint8)
    raise DataError(f"data.path: {file} holds {images.dtype} images; give uint8 pixels or floats in [0, 1]")


def _split(images, labels, split: str, seed: int, test_fraction: float, memory_map: bool) -> ImageData:
    """The ``split`` of the examples: a fixed ``test_fraction`` drawn by ``seed`` is ``test``."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {test_fraction!r}")
    n = len(images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(test_fraction * n))
    chosen = (order[:n_test] if split == "test" else order[n_test:]).sort().values
    if memory_map:
        return ImageData(images=images, labels=labels, rows=chosen)
    return ImageData(images=images[chosen].contiguous(), labels=None if labels is None else labels[chosen])
