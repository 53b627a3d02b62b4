"""Datasets: shapes, dtypes, value ranges, label rules on every item, determinism from the seed, and
clear messages when files are missing. MNIST comes from $GECO_DATA (../shared/data in CI)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import attrs
import pytest
import torch

from geco_core import DataError, create
from geco_core.data import Batches, ImageData, resolve_root
from geco_core.data.mnist import MNIST, of_class

HAS_MNIST = all((resolve_root() / "MNIST/raw" / f).is_file() for f in MNIST.files)
needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason="MNIST idx files not found under $GECO_DATA")


def dataset(name: str, **kwargs) -> ImageData:
    return create("dataset", name, **kwargs)


def test_shapes_are_uint8_images_with_labels_and_deterministic_from_the_seed():
    a = dataset("shapes", n=300, size=24, seed=3)
    assert a.images.dtype == torch.uint8 and a.images.shape == (300, 3, 24, 24)
    assert a.labels.dtype == torch.long and set(a.labels.tolist()) == {0, 1, 2}
    assert a.images.max() > 200 and a.images.min() == 0  # bright shapes on black
    assert torch.equal(a.images, dataset("shapes", n=300, size=24, seed=3).images)
    assert not torch.equal(a.images, dataset("shapes", n=300, size=24, seed=4).images)
    test = dataset("shapes", n=300, size=24, seed=3, split="test")
    assert not torch.equal(a.images, test.images)  # the splits differ


def test_shapes_label_is_the_kind_of_the_top_shape():
    one = dataset("shapes", n=200, size=32, max_shapes=1, channels=1)
    # a lone circle covers about pi*r^2, a square (2*0.8r)^2 = 2.56 r^2, a triangle about 1.3 r^2;
    # normalised by the brightest pixel, the area per label orders the same way on average
    area = (one.images.float() / one.images.flatten(1).amax(1)[:, None, None, None]).flatten(1).sum(1)
    r = [area[one.labels == k].mean() for k in range(3)]
    assert r[0] > r[1] > r[2]


def test_in_memory_batches_are_floats_in_unit_range_with_labels_and_index():
    data = dataset("shapes", n=64, size=16)
    idx = torch.tensor([5, 0, 63])
    b = data.batch(idx)
    assert b.x.dtype == torch.float32 and b.x.shape == (3, 3, 16, 16)
    assert 0.0 <= b.x.min() and b.x.max() <= 1.0
    torch.testing.assert_close(b.x, data.images[idx].float() / 255)
    assert torch.equal(b.labels, data.labels[idx]) and torch.equal(b.index, idx)


def test_batches_cover_every_example_once_per_epoch_and_repeat_exactly():
    batches = Batches(size=103, batch_size=10, seed=7)
    epoch = torch.cat([batches(s) for s in range(batches.per_epoch)])
    assert len(set(epoch.tolist())) == 100  # 10 full batches of distinct examples
    again = Batches(size=103, batch_size=10, seed=7)
    assert all(torch.equal(batches(s), again(s)) for s in (0, 9, 10, 35))
    assert not torch.equal(batches(0), batches(10))  # a new permutation each epoch


@needs_mnist
def test_mnist_reads_the_idx_files_into_memory():
    train, test = dataset("mnist"), dataset("mnist", split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.long
    assert train.labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]  # the canonical first labels
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # against an independent decoder of the same file
    with gzip.open(resolve_root() / "MNIST/raw/t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    assert bytes(test.images[123].flatten().tolist()) == raw[16 + 123 * 784 : 16 + 124 * 784]


@needs_mnist
def test_fashion_mnist_reads_its_own_files():
    test = dataset("fashion-mnist", split="test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10


@needs_mnist
def test_color_mnist_stacks_three_mnist_digits_with_their_labels():
    base = dataset("mnist", split="test")
    data = dataset("color-mnist", split="test", n=2000, seed=1)
    assert data.images.shape == (2000, 3, 28, 28) and data.labels.shape == (2000, 3)
    # every channel is an MNIST test digit carrying that digit's label
    index = {bytes(img.flatten().tolist()): int(l) for img, l in zip(base.images[:, 0], base.labels)}
    for img, labels in zip(data.images[:300], data.labels[:300]):
        assert [index[bytes(ch.flatten().tolist())] for ch in img] == labels.tolist()
    assert torch.equal(data.images, dataset("color-mnist", split="test", n=2000, seed=1).images)
    assert not torch.equal(data.images, dataset("color-mnist", split="test", n=2000, seed=2).images)


@needs_mnist
def test_mnist_triplets_obey_the_sum_rule_for_every_item():
    data = dataset("mnist-triplets", split="train", n=20000, seed=5)
    l = data.labels
    assert data.images.shape == (20000, 3, 28, 28)
    assert torch.equal(l[:, 2], (l[:, 0] + l[:, 1]) % 10)
    assert len(torch.unique(l[:, 0])) == 10 and len(torch.unique(l[:, 2])) == 10
    assert torch.equal(data.images, dataset("mnist-triplets", split="train", n=20000, seed=5).images)


def test_drawing_by_class_returns_only_that_class_and_covers_it():
    labels = torch.randint(10, (500,), generator=torch.Generator().manual_seed(0))
    classes = torch.full((4000,), 3)
    picked = of_class(labels, classes, torch.Generator().manual_seed(1))
    assert (labels[picked] == 3).all()
    assert set(picked.tolist()) == set(torch.nonzero(labels == 3).flatten().tolist())


def test_missing_files_say_which_files_go_where(tmp_path):
    with pytest.raises(DataError) as info:
        dataset("mnist", root=str(tmp_path), download=False)
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "MNIST/raw") in msg and "GECO_DATA" in msg


def test_a_failed_download_is_reported_with_the_files_and_leaves_no_empty_folders(tmp_path):
    local = attrs.evolve(MNIST, mirrors=("http://127.0.0.1:9/",))  # refuses at once; nothing leaves
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"download failed: .*Put the original idx .gz files there"):
        local.load(str(root), "train", download=True)
    assert not root.exists()  # neither data/ nor MNIST/raw/ stays behind
    (root / "MNIST").mkdir(parents=True)  # a folder the user made is kept
    with pytest.raises(DataError):
        local.load(str(root), "train", download=True)
    assert (root / "MNIST").is_dir() and not (root / "MNIST" / "raw").exists()


def test_a_corrupt_idx_file_is_a_clear_error(tmp_path):
    raw = tmp_path / "MNIST/raw"
    raw.mkdir(parents=True)
    for f in MNIST.files:
        (raw / f).write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read .*train-images-idx3-ubyte.gz"):
        dataset("mnist", root=str(tmp_path))


def test_cifar10_without_files_names_what_to_put_where(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz .*" + str(tmp_path)):
        dataset("cifar10", root=str(tmp_path), download=False)


def test_data_root_comes_from_argument_then_environment_then_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GECO_DATA", str(tmp_path / "env"))
    assert resolve_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_root() == tmp_path / "env"
    monkeypatch.delenv("GECO_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_root() == tmp_path / "cache" / "geco"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_root() == Path(os.path.expanduser("~")) / ".cache" / "geco"


@needs_mnist
@pytest.mark.parametrize("name", ["mnist-sum", "mnist-sumhard", "mnist-rotate"])
def test_conditional_sets_are_deterministic_from_the_seed(name):
    a, b = dataset(name, split="test", n=500, seed=3), dataset(name, split="test", n=500, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.context, b.context) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, dataset(name, split="test", n=500, seed=4).images)


def _index_of(base: ImageData) -> dict[bytes, int]:
    return {bytes(img.flatten().tolist()): i for i, img in enumerate(base.images[:, 0])}


@needs_mnist
def test_mnist_sum_targets_are_the_sum_of_the_context_digits_for_every_item():
    base = dataset("mnist", split="test")
    index, labels = _index_of(base), base.labels
    data = dataset("mnist-sum", split="test", n=3000, seed=1)
    assert data.context.shape == (3000, 2, 28, 28) and data.images.shape == (3000, 1, 28, 28)
    for ctx, target, label in zip(data.context, data.images, data.labels):
        l0, l1 = (int(labels[index[bytes(c.flatten().tolist())]]) for c in ctx)
        l2 = int(labels[index[bytes(target[0].flatten().tolist())]])
        assert l2 == (l0 + l1) % 10 == int(label)


@needs_mnist
def test_mnist_sumhard_context_is_the_sum_of_the_target_digits_for_every_item():
    base = dataset("mnist", split="test")
    index, labels = _index_of(base), base.labels
    data = dataset("mnist-sumhard", split="test", n=3000, seed=1)
    assert data.context.shape == (3000, 1, 28, 28) and data.images.shape == (3000, 2, 28, 28)
    for ctx, target, label in zip(data.context, data.images, data.labels):
        l0, l1 = (int(labels[index[bytes(t.flatten().tolist())]]) for t in target)
        assert int(labels[index[bytes(ctx[0].flatten().tolist())]]) == (l0 + l1) % 10
        assert label.tolist() == [l0, l1]


def _rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise rotation about the centre (as seen: the top moves left) by affine_grid +
    grid_sample, independent of torchvision's implementation."""
    a = torch.deg2rad(degrees.double())
    theta = torch.zeros(len(images), 2, 3, dtype=torch.float64)
    # output pixel p samples the input at R(a)^-1 p; with rows pointing down that is this matrix
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images.double(), grid, align_corners=False)


@needs_mnist
def test_mnist_rotate_targets_are_another_instance_of_l0_rotated_by_l1_times_30_degrees():
    from geco_core.data.mnist import rotate_triplets, split_generator

    base = dataset("mnist", split="test")
    n = 2000
    data = dataset("mnist-rotate", split="test", n=n, seed=2)
    idx = rotate_triplets(base.labels, n, split_generator(2, "test"))  # the digits the set was drawn from
    l0, l1, l2 = (base.labels[idx[:, k]] for k in range(3))
    assert torch.equal(l2, l0) and (idx[:, 2] != idx[:, 0]).all()  # same class, another instance
    assert torch.equal(data.labels, l0)
    assert torch.equal(data.context, base.images[idx[:, :2], 0])
    expected = _rotate(base.images[idx[:, 2]].double(), 30.0 * l1)
    got = data.images.double()

    def corr(a, b):
        a, b = a.flatten(1) - a.flatten(1).mean(1, keepdim=True), b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    assert corr(got, expected).min() > 0.95  # every item: the rotation the label says
    wrong = _rotate(base.images[idx[:, 2]].double(), 30.0 * l1 + 90)
    assert (corr(got, expected) > corr(got, wrong)).float().mean() > 0.99


def test_the_independent_rotation_turns_counter_clockwise():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 2:6, 12:16] = 1.0  # a blob at the top
    rows, cols = torch.nonzero(_rotate(x, torch.tensor([90.0]))[0, 0] > 0.5, as_tuple=True)
    assert abs(rows.float().mean() - 13.5) < 1 and cols.float().mean() < 6  # now on the left
