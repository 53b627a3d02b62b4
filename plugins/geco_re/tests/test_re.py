"""RE against a naive per-pixel loop in float64, on random images."""

from __future__ import annotations

import pytest
import torch
from geco_re import ReconstructionError
from hypothesis import given
from hypothesis import strategies as st

from geco_core import GECO, Batch, ConfigError, create_constraint

shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))


def naive(x: torch.Tensor, x_hat: torch.Tensor, kappa: float, per: str) -> torch.Tensor:
    """Loop over examples, channels and pixels; float64 sums."""
    B, C, H, W = x.shape
    rows = []
    for b in range(B):
        sq = [[[float(x[b, c, i, j] - x_hat[b, c, i, j]) ** 2 for j in range(W)] for i in range(H)] for c in range(C)]
        if per == "image":
            rows.append([sum(v for ch in sq for row in ch for v in row) / (C * H * W) - kappa**2])
        elif per == "channel":
            rows.append([sum(v for row in ch for v in row) / (H * W) - kappa**2 for ch in sq])
        else:
            rows.append([v - kappa**2 for ch in sq for row in ch for v in row])
    return torch.tensor(rows, dtype=torch.float64)


@given(shapes, st.floats(0.01, 0.5), st.sampled_from(["image", "channel", "pixel"]), st.integers(0, 10**6))
def test_values_match_a_naive_loop(shape, kappa, per, seed):
    g = torch.Generator().manual_seed(seed)
    x, x_hat = (
        torch.rand(shape, generator=g, dtype=torch.float64),
        torch.rand(shape, generator=g, dtype=torch.float64),
    )
    re = ReconstructionError(kappa, per=per, image_shape=shape[1:])
    values = re(Batch(x=x, x_hat=x_hat))
    assert values.shape == (shape[0], re.dim)
    torch.testing.assert_close(values, naive(x, x_hat, kappa, per), rtol=1e-12, atol=1e-12)


def test_satisfied_exactly_when_pixel_rmse_is_at_most_kappa():
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_hat = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    rmse = (x - x_hat).square().flatten(1).mean(1).sqrt()
    for kappa in (0.05, 0.09, 0.1, 0.2):
        satisfied = ReconstructionError(kappa)(Batch(x, x_hat))[:, 0] <= 0
        assert torch.equal(satisfied, rmse <= kappa)


def test_gradient_reaches_the_reconstruction_and_is_finite():
    x = torch.rand(4, 1, 5, 5)
    x_hat = torch.rand(4, 1, 5, 5, requires_grad=True)
    ReconstructionError(0.1)(Batch(x, x_hat)).sum().backward()
    torch.testing.assert_close(x_hat.grad, 2 * (x_hat - x).detach() / 25)


def test_unknown_per_and_missing_image_shape_are_rejected():
    with pytest.raises(ConfigError, match="per must be one of"):
        ReconstructionError(0.1, per="row")
    with pytest.raises(ConfigError, match="needs image_shape"):
        ReconstructionError(0.1, per="pixel")


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match=r"differ in shape: x \(2, 1, 4, 4\) vs x_hat \(2, 1, 4, 5\)"):
        ReconstructionError(0.1)(Batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5)))
    re = ReconstructionError(0.1, per="channel", image_shape=(3, 4, 4))
    with pytest.raises(ValueError, match="was set up for images"):
        re(Batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)))


def test_per_pixel_gives_each_dimension_its_own_multiplier():
    re = create_constraint("re", kappa=0.1, per="pixel", image_shape=(1, 2, 2))
    geco = GECO([re], controller="paper", lr=10.0)
    x = torch.zeros(8, 1, 2, 2)
    x_hat = torch.zeros(8, 1, 2, 2)
    x_hat[:, 0, 0, 0] = 0.5  # only the top-left pixel violates its bound
    geco(torch.zeros(8), Batch(x, x_hat))
    assert geco.component_names == [f"re[{j}]" for j in range(4)]
    assert geco.lambdas[0] > 1 and (geco.lambdas[1:] < 1).all()


@pytest.mark.parametrize("kappa", [0, -0.1, 1.0, 1.5, float("nan")])
def test_a_kappa_no_pixel_rmse_can_take_is_rejected_in_one_line(kappa):
    """Pixels lie in [0, 1], so an RMSE of 1 or more asks for nothing (the run trains to KL 0)."""
    with pytest.raises(ConfigError, match=r"re: kappa must be a pixel RMSE in \(0, 1\)") as info:
        ReconstructionError(kappa)
    assert "\n" not in str(info.value)
    assert ReconstructionError(0.999).kappa == 0.999
