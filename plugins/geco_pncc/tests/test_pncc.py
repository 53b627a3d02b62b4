"""pNCC against a naive patch loop in float64 (explicit whitened patch vectors), flat patches included."""

from __future__ import annotations

import math

import pytest
import torch
from geco_pncc import PatchNCC, patch_ncc
from hypothesis import given
from hypothesis import strategies as st

from geco_core import Batch, ConfigError, create_constraint


def naive(x: torch.Tensor, y: torch.Tensor, k: int, eps: float, joint: bool) -> torch.Tensor:
    """Every valid patch, whitened as an explicit vector: centred entries / sqrt(n), plus sqrt(eps)."""

    def whiten(p: torch.Tensor) -> torch.Tensor:
        p = p.flatten()
        a = torch.cat([(p - p.mean()) / math.sqrt(p.numel()), torch.tensor([math.sqrt(eps)], dtype=p.dtype)])
        return a / a.norm()

    B, C, H, W = x.shape
    groups = [slice(0, C)] if joint else [slice(c, c + 1) for c in range(C)]
    out = torch.empty(B, len(groups), H - k + 1, W - k + 1, dtype=torch.float64)
    for b in range(B):
        for g, ch in enumerate(groups):
            for i in range(H - k + 1):
                for j in range(W - k + 1):
                    px, py = x[b, ch, i : i + k, j : j + k], y[b, ch, i : i + k, j : j + k]
                    out[b, g, i, j] = whiten(px) @ whiten(py)
    return out


def images(seed: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images with flat regions: a black block, a constant grey block, in both or one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (x + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    x[..., :3, :3] = 0.0  # flat in both
    y[..., :3, :3] = 0.0
    x[..., -3:, -3:] = 0.5  # flat in x only
    y[0, ..., -2:, :] = 0.7  # flat rows in y only
    return x, y


@given(
    st.integers(0, 10**6),
    st.integers(2, 4),
    st.sampled_from([1e-4, 1e-2]),
    st.booleans(),
    st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(5, 7), st.integers(5, 8)),
)
def test_box_filters_match_a_naive_patch_loop(seed, k, eps, joint, shape):
    x, y = images(seed, shape)
    torch.testing.assert_close(patch_ncc(x, y, k, eps, joint), naive(x, y, k, eps, joint), rtol=1e-9, atol=1e-9)


def test_flat_patches_are_defined_never_nan_and_bounded():
    x = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    y = torch.zeros(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    ncc = patch_ncc(x, y, 3)
    assert torch.equal(ncc, torch.ones_like(ncc))  # flat against flat: perfect
    ncc.sum().backward()
    assert torch.isfinite(y.grad).all()
    textured = torch.rand(1, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert patch_ncc(x, textured, 3).abs().max() < 0.1  # flat against texture: about 0


@given(st.integers(0, 10**6))
def test_values_stay_in_minus_one_one_and_identical_images_correlate_perfectly(seed):
    x, y = images(seed, (2, 3, 8, 8))
    ncc = patch_ncc(x, y, 3)
    assert (ncc <= 1 + 1e-12).all() and (ncc >= -1 - 1e-12).all()
    torch.testing.assert_close(patch_ncc(x, x, 3), torch.ones_like(ncc))
    z = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(patch_ncc(z, 1 - z, 3, eps=1e-12), -torch.ones_like(ncc))


def test_the_constraint_is_kappa_minus_the_mean_correlation_and_units_invert():
    x, y = images(3, (4, 2, 9, 9))
    c = PatchNCC(kappa=0.7, patch=4)
    values = c(Batch(x, y))
    assert values.shape == (4, 1)
    torch.testing.assert_close(values[:, 0], 0.7 - naive(x, y, 4, 1e-4, False).flatten(1).mean(1))
    torch.testing.assert_close(c.reached(values), 0.7 - values)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kappa=1.5), "kappa must be a correlation in \\(-1, 1\\)"),
        (dict(kappa=1.0), "kappa must be a correlation in \\(-1, 1\\)"),
        (dict(kappa=-1.0), "kappa"),
        (dict(kappa=0.8, patch=1), "patch must be an integer >= 2"),
        (dict(kappa=0.8, eps=0.0), "eps must be > 0"),
        (dict(kappa=0.8, channels="rgb"), "channels must be separate or joint"),
        (dict(kappa=0.8, patch=9, image_shape=(1, 8, 8)), "patch 9 is larger than the images"),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_constraint("pncc", **kwargs)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        PatchNCC(0.8)(Batch(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9)))
