"""Models (shapes, KL against torch.distributions) and objectives (NLLs against torch.distributions,
the annealing schedule), in float64 on random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from geco_core import ConfigError, create
from geco_core.data.base import DataBatch, ImageData
from geco_core.models import DiagonalGaussian, Output
from geco_core.training.objectives import ELBO, AnnealedBeta, Beta, Likelihood

SHAPES = [(1, 28, 28), (3, 28, 28), (3, 32, 32), (3, 64, 64)]


@pytest.mark.parametrize("name", ["conv-vae", "mlp-vae"])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_model_maps_every_image_size_to_logits_and_per_example_kl(name, shape):
    torch.manual_seed(0)
    model = create("model", name, image_shape=shape, latent_dim=8)
    out = model(torch.rand(5, *shape))
    assert out.logits.shape == (5, *shape) and out.kl.shape == (5,)
    assert torch.isfinite(out.kl).all() and (out.kl >= 0).all()
    assert 0 <= out.x_hat.min() and out.x_hat.max() <= 1
    samples = model.sample(3)
    assert samples.shape == (3, *shape) and 0 <= samples.min() and samples.max() <= 1


@given(st.integers(0, 10**6), st.integers(1, 6))
def test_analytic_kl_matches_torch_distributions(seed, dim):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(4, dim, generator=g, dtype=torch.float64) * 2
    log_var = torch.randn(4, dim, generator=g, dtype=torch.float64)
    q = DiagonalGaussian(mu, log_var)
    ref_q = Independent(Normal(mu, (0.5 * log_var).exp()), 1)
    ref_p = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    torch.testing.assert_close(q.kl_standard_normal(), kl_divergence(ref_q, ref_p))
    z = torch.randn(4, dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), ref_q.log_prob(z))


def test_the_model_kl_is_that_of_its_posterior():
    torch.manual_seed(0)
    model = create("model", "conv-vae", image_shape=(1, 28, 28), latent_dim=4).double()
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    q = model.posterior(x)
    ref = kl_divergence(Normal(q.mu, (0.5 * q.log_var).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(model(x).kl, ref)


def test_bad_model_options_are_named():
    with pytest.raises(ConfigError, match="unknown argument 'latent'"):
        create("model", "conv-vae", image_shape=(1, 28, 28), latent=3)
    with pytest.raises(ConfigError, match="too many for 4x4"):
        create("model", "conv-vae", image_shape=(1, 4, 4), channels=(8, 8, 8))


@pytest.mark.parametrize("name", ["conv-vae", "mlp-vae"])
def test_output_start_mean_adds_the_log_odds_of_the_mean_image_to_every_logit(name):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[:, :, :2] = 0  # a black border: clamped to 0.01 before the log-odds
    data = ImageData(images)
    mean = images.double().div(255).mean(0)  # the reference: float64 over every image at once
    torch.testing.assert_close(data.mean_image(batch_size=7).double(), mean, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    model = create("model", name, image_shape=(3, 8, 8), latent_dim=4, output_start="mean", data_mean=data.mean_image)
    grey = create("model", name, image_shape=(3, 8, 8), latent_dim=4)
    torch.testing.assert_close(
        model.pixel_bias.detach().double(), torch.logit(mean.clamp(0.01, 0.99)), atol=1e-5, rtol=0
    )
    torch.manual_seed(1)
    logits = model.sample_logits(5)
    torch.manual_seed(1)
    torch.testing.assert_close(logits, model.decoder(torch.randn(5, 4)) + model.pixel_bias)
    assert "pixel_bias" in model.state_dict() and "pixel_bias" not in grey.state_dict()
    assert model.pixel_bias.requires_grad  # learned: it starts at the mean, it does not stay there
    model(torch.rand(2, 3, 8, 8)).logits.sum().backward()
    assert model.pixel_bias.grad is not None and model.pixel_bias.grad.abs().sum() > 0


def test_bad_output_starts_are_named():
    with pytest.raises(ConfigError, match="output_start must be one of grey, mean, got 'black'"):
        create("model", "conv-vae", image_shape=(1, 28, 28), output_start="black")
    with pytest.raises(ConfigError, match="output_start = 'mean' needs data_mean"):
        create("model", "mlp-vae", image_shape=(1, 28, 28), output_start="mean")
    with pytest.raises(ConfigError, match=r"data_mean must be \(1, 28, 28\), got \(28, 28\)"):
        create("model", "conv-vae", image_shape=(1, 28, 28), output_start="mean", data_mean=torch.rand(28, 28))


def _output(seed: int, shape=(3, 2, 4, 5)) -> tuple[Output, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    kl = torch.rand(shape[0], generator=g, dtype=torch.float64) * 10
    return Output(logits, kl), torch.rand(shape, generator=g, dtype=torch.float64)


@given(st.integers(0, 10**6), st.floats(0.01, 2.0))
def test_gaussian_nll_matches_torch_distributions(seed, sigma):
    out, x = _output(seed)
    lik = Likelihood("gaussian", sigma=sigma).double()
    assert lik.log_sigma.exp().item() == pytest.approx(sigma, rel=1e-6)
    ref = -Normal(out.x_hat, lik.log_sigma.detach().exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.nll(out, x), ref)


@given(st.integers(0, 10**6))
def test_bernoulli_nll_matches_torch_distributions(seed):
    out, x = _output(seed)
    x = (x > 0.5).double()
    ref = -Bernoulli(logits=out.logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Likelihood("bernoulli").nll(out, x), ref)


@given(st.integers(0, 10**6), st.floats(0.1, 5.0))
def test_elbo_and_beta_losses_weight_the_kl_by_beta(seed, beta):
    out, x = _output(seed)
    batch = DataBatch(x=x, index=torch.arange(len(x)))
    nll = Likelihood("gaussian", sigma=0.3).double().nll(out, x)
    elbo = ELBO(sigma=0.3).double()
    torch.testing.assert_close(elbo(out, batch, step=0), (nll + out.kl).mean())
    weighted = Beta(beta, sigma=0.3).double()
    torch.testing.assert_close(weighted(out, batch, step=0), (nll + beta * out.kl).mean())
    m = weighted.metrics(out, batch, step=0)
    assert m["beta"].item() == pytest.approx(beta) and m["nll"].item() == pytest.approx(nll.mean().item())
    assert m["mse"].item() == pytest.approx((x - out.x_hat).square().mean().item())


def test_annealed_beta_moves_linearly_from_start_to_end_then_stays():
    obj = AnnealedBeta(beta_start=2.0, beta_end=0.7, anneal_steps=100)
    assert obj.beta(0) == 2.0 and obj.beta(100) == pytest.approx(0.7) and obj.beta(5000) == pytest.approx(0.7)
    assert obj.beta(25) == pytest.approx(2.0 - 0.25 * 1.3)
    steps = [obj.beta(s) for s in range(0, 101, 10)]
    diffs = [b - a for a, b in zip(steps, steps[1:])]
    assert all(d == pytest.approx(diffs[0]) for d in diffs)


def test_the_learned_sigma_receives_a_gradient_and_a_fixed_one_does_not():
    out, x = _output(0)
    learned, fixed = Likelihood(sigma=0.5).double(), Likelihood(sigma=0.5, learn_sigma=False).double()
    learned.nll(out, x).sum().backward()
    assert learned.log_sigma.grad is not None and learned.log_sigma.grad != 0
    assert not fixed.log_sigma.requires_grad
