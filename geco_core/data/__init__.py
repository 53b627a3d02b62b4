"""Datasets, registered through the same ``geco`` hooks as any plugin's (``geco datasets`` lists them).

A dataset factory takes keyword arguments among ``root``, ``split``, ``seed``, ``download`` (the
trainer passes those it accepts) and its own options, and returns an :class:`ImageData`.
"""

from __future__ import annotations

from geco_core.data.base import Batches, DataBatch, ImageData, resolve_root
from geco_core.data.files import folder, tensor_file
from geco_core.data.mnist import (
    color_mnist,
    fashion_mnist,
    mnist,
    mnist_rotate,
    mnist_sum,
    mnist_sumhard,
    mnist_triplets,
)
from geco_core.data.shapes import shapes
from geco_core.data.vision import celeba, cifar10
from geco_core.hookspecs import hookimpl

__all__ = ["ImageData", "DataBatch", "Batches", "resolve_root"]


@hookimpl
def geco_register_datasets(register):
    register(shapes, name="shapes")
    register(mnist, name="mnist")
    register(fashion_mnist, name="fashion-mnist")
    register(color_mnist, name="color-mnist")
    register(mnist_triplets, name="mnist-triplets")
    register(mnist_sum, name="mnist-sum")
    register(mnist_sumhard, name="mnist-sumhard")
    register(mnist_rotate, name="mnist-rotate")
    register(cifar10, name="cifar10")
    register(celeba, name="celeba")
    register(folder, name="folder")
    register(tensor_file, name="tensor")
