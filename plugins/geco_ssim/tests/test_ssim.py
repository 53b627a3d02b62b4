"""SSIM against a float64 implementation of its definition (Wang et al. 2004), on random images;
per channel, MS-SSIM's size limit, and kappa's range."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geco_core import Batch, ConfigError, create_constraint


def reference(x: torch.Tensor, y: torch.Tensor, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The SSIM map of each channel, float64: Gaussian window, valid positions, c1 = 0.01^2,
    c2 = 0.03^2 (pixels in [0, 1]); averaged over positions: ``(B, C)``."""
    x, y = x.double(), y.double()
    g = torch.exp(-((torch.arange(win, dtype=torch.float64) - win // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None].expand(x.shape[1], 1, win, win)

    def local(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window, groups=x.shape[1])

    mx, my = local(x), local(y)
    sxx, syy, sxy = local(x * x) - mx**2, local(y * y) - my**2, local(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return ssim.flatten(2).mean(2)


@settings(max_examples=25)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.0, 0.5), channels=st.sampled_from([1, 3]))
def test_ssim_is_the_definition_per_image_and_per_channel(seed, noise, channels):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, channels, 28, 28, generator=g)
    x_hat = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    truth = reference(x, x_hat)
    image = create_constraint("ssim", kappa=0.9, image_shape=(channels, 28, 28))
    channel = create_constraint("ssim", kappa=0.9, per="channel", image_shape=(channels, 28, 28))
    batch = Batch(x=x, x_hat=x_hat)
    torch.testing.assert_close(image.reached(image(batch)).double(), truth.mean(1, keepdim=True), atol=2e-6, rtol=0)
    torch.testing.assert_close(channel.reached(channel(batch)).double(), truth, atol=2e-6, rtol=0)


def test_identical_images_meet_any_kappa_below_one_and_noise_lowers_ssim():
    x = torch.rand(2, 1, 28, 28)
    ssim = create_constraint("ssim", kappa=0.95, image_shape=(1, 28, 28))
    assert (ssim(Batch(x=x, x_hat=x)) <= 0).all()
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    assert (ssim(Batch(x=x, x_hat=noisy)) > 0).all()


def test_ms_ssim_needs_large_images_and_says_so():
    with pytest.raises(ConfigError, match="MS-SSIM needs images of at least 161 px a side; these are 28 x 28"):
        create_constraint("ssim", kappa=0.9, multiscale=True, image_shape=(1, 28, 28))
    ms = create_constraint("ssim", kappa=0.9, multiscale=True, image_shape=(1, 176, 176))
    x = torch.rand(1, 1, 176, 176)
    assert ms(Batch(x=x, x_hat=x)).item() == pytest.approx(0.9 - 1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="ssim: kappa must be an SSIM in"):
        create_constraint("ssim", kappa=1.0)
