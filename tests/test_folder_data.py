"""A researcher's own images: a folder of PNG/JPEG files (class sub-folders as labels) or a tensor
file, decoded once into a cache beside the data, trained in memory or memory-mapped, and bad
folders told in one line naming the file."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_training import TINY

from geco_core.data import files
from geco_core.data.files import folder, tensor_file
from geco_core.errors import DataError
from geco_core.training import Config, Run, train

Image = pytest.importorskip("PIL.Image")


def write_images(root, sizes=((20, 24),), classes=("cats", "dogs"), per_class=12, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            pixels = (rng.random((h, w, channels)) * 255).astype("uint8").squeeze()
            Image.fromarray(pixels, mode).save(root / c / f"{i:03d}.png")
    return root


def test_class_folders_become_labels_and_images_are_brought_to_the_size(tmp_path):
    root = write_images(tmp_path / "pets", sizes=((20, 24), (30, 18)))
    train_ = folder(str(root), size=16, seed=3)
    test = folder(str(root), size=16, seed=3, split="test")
    assert train_.images.shape[1:] == (3, 16, 16) and len(train_) + len(test) == 24
    assert len(test) == round(0.1 * 24)
    assert sorted(train_.labels.tolist() + test.labels.tolist()) == [0] * 12 + [1] * 12
    cropped = folder(str(root), size=[8, 12], fit="crop")
    assert cropped.images.shape[1:] == (3, 8, 12)
    # the pixels are the file's, resized: compare one image with Pillow's own bilinear resize
    all_ = folder(str(root), size=16, test_fraction=0.5, seed=0)
    first = all_.images[0]
    index = torch.randperm(24, generator=torch.Generator().manual_seed(0))[12:].sort().values[0]
    name = f"{'cats' if index < 12 else 'dogs'}/{int(index) % 12:03d}.png"
    expected = np.asarray(Image.open(root / name).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    assert torch.equal(first, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    gray = write_images(tmp_path / "gray", classes=("a",), mode="L")
    assert folder(str(gray), size=8).images.shape[1] == 1  # every image grayscale: one channel


def test_the_cache_is_written_once_reused_and_renewed_when_the_folder_changes(tmp_path, monkeypatch):
    root = write_images(tmp_path / "pets")
    first = folder(str(root), size=16)
    (cache,) = (root / ".geco-cache").glob("*.u8")
    stamp = cache.stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(files, "_decode", no_decoding)
        again = folder(str(root), size=16)
    assert torch.equal(first.images, again.images) and cache.stat().st_mtime_ns == stamp
    Image.fromarray(np.zeros((20, 24, 3), "uint8")).save(root / "cats" / "new.png")
    renewed = folder(str(root), size=16, test_fraction=0.5)
    assert len(renewed) == 13 and len(list((root / ".geco-cache").glob("*.u8"))) == 2


def test_a_read_only_folder_caches_under_the_data_root(tmp_path, monkeypatch):
    root = write_images(tmp_path / "pets", per_class=4)
    real_mkdir = type(root).mkdir

    def refuse(self, *args, **kwargs):
        if self.name == ".geco-cache":
            raise PermissionError("read-only")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(root), "mkdir", refuse)
    data = folder(str(root), size=8, root=str(tmp_path / "cache-root"))
    assert len(data) == 7 and list((tmp_path / "cache-root" / "folder-cache").rglob("*.u8"))


def test_memory_mapped_data_batches_as_the_in_memory_data_and_splits_without_copying(tmp_path):
    root = write_images(tmp_path / "pets")
    memory = folder(str(root), size=16)
    mapped = folder(str(root), size=16, memory_map=True)
    assert mapped.rows is not None and len(mapped.images) == 24 and len(mapped) == len(memory)
    index = torch.tensor([5, 0, 17, 3])
    a, b = memory.batch(index), mapped.batch(index)
    assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels) and torch.equal(a.index, b.index)
    rest, held = mapped.split(4, seed=1)
    rest_m, held_m = memory.split(4, seed=1)
    assert rest.images is mapped.images and held.images is mapped.images  # rows chosen, no images copied
    assert torch.equal(rest.batch(torch.arange(len(rest))).x, rest_m.batch(torch.arange(len(rest_m))).x)
    assert torch.equal(held.to("cpu").images, held_m.images)


def test_tensor_files_train_like_folders(tmp_path):
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    np.save(tmp_path / "x.npy", images.numpy())
    torch.save({"images": images.float() / 255, "labels": torch.arange(30) % 3}, tmp_path / "x.pt")
    a = tensor_file(str(tmp_path / "x.npy"), seed=2)
    b = tensor_file(str(tmp_path / "x.pt"), seed=2)
    c = tensor_file(str(tmp_path / "x.npy"), seed=2, memory_map=True)
    index = torch.arange(len(a))
    assert torch.equal(a.batch(index).x, b.batch(index).x) and torch.equal(a.batch(index).x, c.batch(index).x)
    assert b.labels is not None and a.labels is None and len(a) == 27


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root.mkdir(), "no PNG/JPG/JPEG images in"),
        (lambda root: write_images(root, sizes=((20, 24), (21, 24))), "give data.size to bring them to one size"),
        (lambda root: (write_images(root), (root / "dogs" / "bad.png").write_bytes(b"not a png")), "bad.png"),
        (lambda root: (write_images(root), (root / "loose.jpg").write_bytes(b"x")), "loose.jpg lies beside class"),
    ],
)
def test_a_bad_folder_is_told_in_one_line_naming_the_file(tmp_path, make, message):
    root = tmp_path / "pets"
    make(root)
    with pytest.raises(DataError, match=message) as error:
        folder(str(root))
    assert "\n" not in str(error.value)


def test_geco_train_trains_on_a_folder_memory_mapped(tmp_path):
    root = write_images(tmp_path / "pets", per_class=40)
    doc = copy.deepcopy(TINY)
    doc["data"] = {"name": "folder", "path": str(root), "size": 16, "memory_map": True}
    doc["train"] = {**doc["train"], "steps": 4, "validation": 8}
    run = train(config=Config.from_dict(doc), run_dir=tmp_path / "run")
    summary = Run.open(run).read_summary()
    assert summary["steps"] == 4 and summary["heldout"]["examples"] == 8  # the test split: 10% of 80
