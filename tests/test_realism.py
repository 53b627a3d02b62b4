"""The realism measure: the Fréchet distance against an independent float64 computation and against
the closed form for two Gaussians; its feature network found by data set; `geco eval` reporting it."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import needs_plugins
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from geco_core.evaluation.realism import feature_network_for, frechet_distances


class Identity(nn.Module):
    """Features = the inputs themselves (B, d)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x.flatten(1)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def closed_form(mu1, s1, mu2, s2) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``, float64, through symmetric square
    roots (not the eigenvalues of S1 S2 that torchmetrics takes)."""
    r = _sqrtm_psd(s1)
    return float((mu1 - mu2).square().sum() + torch.trace(s1 + s2 - 2 * _sqrtm_psd(r @ s2 @ r)))


def _gaussian(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return torch.randn(d, generator=g, dtype=torch.float64), a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


@settings(max_examples=15, deadline=None)
@given(d=st.integers(2, 6), seed=st.integers(0, 10_000), n=st.integers(20, 200))
def test_distance_equals_the_closed_form_of_the_samples_own_statistics(d, seed, n):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 1
    b = torch.randn(n + 7, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    fd = frechet_distances(Identity(d), [a[: n // 2], a[n // 2 :]], other=[b])["other"]
    expected = closed_form(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert fd == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_distance_between_samples_of_two_gaussians_approaches_their_closed_form():
    d, n = 4, 200_000
    (mu1, s1), (mu2, s2) = _gaussian(d, 1), _gaussian(d, 2)
    g = torch.Generator().manual_seed(0)
    x = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    fd = frechet_distances(Identity(d), [x], y=[y], x_again=[x[: n // 2]])
    truth = closed_form(mu1, s1, mu2, s2)
    assert truth > 1 and fd["y"] == pytest.approx(truth, rel=0.02)
    assert fd["x_again"] < 0.01 * truth  # the same distribution: only sampling error


@needs_plugins
def test_mnist_family_data_find_the_digit_features_and_others_none():
    name, net = feature_network_for("color-mnist", (3, 28, 28))
    assert name == "digits" and net.num_features == 192
    x = torch.rand(5, 3, 28, 28)
    features = net(x)
    assert features.shape == (5, 192)
    torch.testing.assert_close(features[:, 64:128], net(x[:, 1:2].expand(5, 3, 28, 28))[:, :64])  # per channel
    assert feature_network_for("shapes", (1, 16, 16)) is None
