"""The evaluation's estimators against known answers and independent references, and ``geco eval``
on short real runs of every model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_data import needs_mnist
from test_training import TINY, config

from geco_core.evaluation import log_aggregate_density, log_density_matrix, marginal_kl, quantised_normal_log_prob
from geco_core.models.base import DiagonalGaussian
from geco_core.models.convdraw import ConvDraw
from geco_core.models.nvp import VAENVP
from geco_core.training import train
from geco_core.training.config import Config

# --- the quantised normal ----------------------------------------------------------------------


def _bin_probability(k: int, mu: float, sigma: float, points: int = 4001) -> float:
    """Independent reference: Simpson's rule on the normal density over bin k (the open outer
    bins cut at 40 sigma), float64; no differences of CDFs, so no cancellation in the tails."""
    h = 0.5 / 255
    a = mu - 40 * sigma if k == 0 else k / 255 - h
    b = mu + 40 * sigma if k == 255 else k / 255 + h
    if k == 0:
        b = h
    if k == 255:
        a = 1 - h
    if b <= a:
        return 0.0
    xs = [a + (b - a) * i / (points - 1) for i in range(points)]
    f = [math.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi)) for x in xs]
    w = (b - a) / (points - 1)
    return w / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@settings(max_examples=40)
@example(k=130, mu=0.5, sigma=0.01)  # a narrow normal, where float32 pixels once moved the bin edges
@given(
    k=st.integers(0, 255),
    mu=st.floats(-0.1, 1.1),
    sigma=st.floats(0.01, 0.5),
)
def test_quantised_normal_matches_numerical_integration_of_the_bin(k, mu, sigma):
    reference = _bin_probability(k, mu, sigma)
    # pixels arrive as float32, which misses k/255 by up to 3e-8: the level must still be exact
    got = quantised_normal_log_prob(torch.tensor([k / 255]), torch.tensor([mu], dtype=torch.float64), sigma)
    if reference < 1e-250:  # beyond float64; the closed form must still be finite and tiny
        assert got.item() < -500
        return
    assert got.item() == pytest.approx(math.log(reference), rel=1e-6, abs=1e-6)


@settings(max_examples=30)
@given(mu=st.floats(-0.2, 1.2), sigma=st.floats(1e-3, 2.0))
def test_the_256_probabilities_sum_to_one(mu, sigma):
    levels = torch.arange(256, dtype=torch.float64) / 255
    p = quantised_normal_log_prob(levels, torch.full((256,), mu, dtype=torch.float64), sigma).exp()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)


def test_a_mean_on_a_bin_centre_gives_the_closed_form_erf():
    """mu = k/255: P = Phi(h/sigma) - Phi(-h/sigma) = erf(h / (sigma sqrt 2)), h = 0.5/255."""
    g = torch.Generator().manual_seed(0)
    k = torch.randint(1, 255, (50,), generator=g)
    sigma = torch.rand(50, generator=g, dtype=torch.float64) * 0.2 + 1e-3
    x = k.double() / 255
    got = quantised_normal_log_prob(x, x, sigma)
    expected = torch.special.erf(0.5 / 255 / (sigma * math.sqrt(2))).log()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_far_tails_stay_finite():
    x = torch.tensor([0.0, 1.0, 0.5, 0.5])
    mu = torch.tensor([1.0, 0.0, 0.0, 1.0])
    got = quantised_normal_log_prob(x, mu, 0.01)
    assert torch.isfinite(got).all() and (got < -1000).all()


# --- the marginal KL ---------------------------------------------------------------------------


class GaussianEncoder(torch.nn.Module):
    """A stand-in model: 'x' is the table of posterior means; one shared log-variance; N(0, I) prior."""

    conditional = False

    def __init__(self, log_var: float) -> None:
        super().__init__()
        self.log_var = log_var

    def posterior(self, x, context=None):
        return DiagonalGaussian(x, torch.full_like(x, self.log_var))

    def prior_log_prob(self, z, context=None):
        return -0.5 * (z.square() + math.log(2 * math.pi)).sum(-1)


def _average_kl(mu: torch.Tensor, log_var: float) -> float:
    return float(DiagonalGaussian(mu, torch.full_like(mu, log_var)).kl_standard_normal().mean())


def test_posterior_equal_to_the_prior_gives_zero():
    torch.manual_seed(0)
    result = marginal_kl(GaussianEncoder(0.0), torch.zeros(300, 5))
    # exact up to the float32 of log p(z)
    assert abs(result["marginal_kl"]) < 1e-6 and abs(result["average_kl_mc"]) < 1e-6


def test_an_aggregate_posterior_equal_to_the_prior_gives_near_zero_while_the_average_kl_is_large():
    """mu ~ N(0, 1 - s^2), variance s^2: q(z) = N(0, 1) exactly in the limit of many examples."""
    torch.manual_seed(0)
    s2, d, n = 0.09, 3, 4000
    mu = torch.randn(n, d) * math.sqrt(1 - s2)
    result = marginal_kl(GaussianEncoder(math.log(s2)), mu)
    average = _average_kl(mu, math.log(s2))
    assert average > 3.0
    assert abs(result["marginal_kl"]) < 0.1 + 3 * result["stderr"]
    assert result["average_kl_mc"] == pytest.approx(average, rel=0.05)


@settings(max_examples=15)
@given(
    scale=st.floats(0.1, 4.0),
    log_var=st.floats(-6.0, 1.0),
    d=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_marginal_kl_never_exceeds_the_average_kl(scale, log_var, d, seed):
    torch.manual_seed(seed)
    n = 200
    mu = torch.randn(n, d) * scale + torch.randn(1, d)
    result = marginal_kl(GaussianEncoder(log_var), mu, samples_per_example=3)
    average = _average_kl(mu, log_var)
    assert result["marginal_kl"] <= average + 4 * result["stderr"] + 1e-9
    # the n-sample mutual information of the same draws lies in [.., log n] exactly
    assert result["mutual_information"] <= math.log(n) + 1e-9
    assert result["samples"] == 3 * n


def test_the_gaussian_matrix_equals_a_loop_over_pairs_in_float64():
    g = torch.Generator().manual_seed(1)
    q = DiagonalGaussian(torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g))
    z = torch.randn(5, 4, generator=g) * 2
    q64 = DiagonalGaussian(q.mu.double(), q.log_var.double())
    expected = torch.stack([q64.take(torch.tensor([i] * 5)).log_prob(z.double()) for i in range(7)])
    torch.testing.assert_close(log_density_matrix(q, 7, z), expected, rtol=1e-10, atol=1e-10)


def _flow_posterior(n: int, seed: int):
    """The posterior of a small VAE+NVP (couplings at the identity) for n random images."""
    torch.manual_seed(seed)
    model = VAENVP((1, 12, 12), latent_dim=4, channels=(8,), hidden=16, flow_layers=2, flow_hidden=16).eval()
    x = torch.rand(n, 1, 12, 12)
    with torch.no_grad():
        return model.posterior(x)


def _loop_over_pairs(q, n: int, z: torch.Tensor) -> torch.Tensor:
    """Independent reference: ``log q(z_j | x_i)`` one example i at a time, float64, ``(n, m)``."""
    return torch.stack([q.take(torch.tensor([i] * len(z))).log_prob(z) for i in range(n)]).double()


def test_the_flow_matrix_by_pairs_equals_a_loop_and_reduces_to_the_gaussian_at_identity():
    q = _flow_posterior(9, seed=2)
    with torch.no_grad():
        z = q.sample()[:5]
        matrix = log_density_matrix(q, 9, z)
        loop = _loop_over_pairs(q, 9, z)
        torch.testing.assert_close(matrix, loop)
        # the couplings start as the identity: the flow's matrix is its base Gaussian's
        torch.testing.assert_close(matrix, log_density_matrix(q.base, 9, z), rtol=1e-5, atol=1e-4)


def test_convdraw_pairs_match_a_loop_and_its_kl_is_the_mean_of_log_q_minus_log_p():
    torch.manual_seed(3)
    model = ConvDraw((1, 8, 8), steps=2, z_channels=2, hidden=8).eval()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        q = model.posterior(x)
        z = q.sample()
        assert z.shape == (6, 2 * 2 * 2 * 2)
        matrix = log_density_matrix(q, 6, z)
        loop = torch.tensor(
            [[float(q.take(torch.tensor([i])).log_prob(z[j : j + 1])) for j in range(6)] for i in range(6)]
        )
        torch.testing.assert_close(matrix.float(), loop, rtol=1e-5, atol=1e-4)
        # Monte Carlo: E_q[log q(z|x) - log p(z)] is the summed per-step analytic KL
        xs = x[:1].expand(4000, -1, -1, -1)
        qs = model.posterior(xs)
        draws = qs.sample()
        mc = qs.log_prob(draws) - model.prior_log_prob(draws)
        analytic = model(xs).kl
    assert float(mc.mean()) == pytest.approx(float(analytic.mean()), abs=4 * float(mc.std()) / math.sqrt(4000) + 0.05)


# --- geco eval on real runs --------------------------------------------------------------------

MODELS = {
    "mlp-vae": {"name": "mlp-vae", "latent_dim": 4, "hidden": [64]},
    "conv-vae": {"name": "conv-vae", "latent_dim": 4, "channels": [8, 16], "hidden": 32},
    "vae-nvp": {"name": "vae-nvp", "latent_dim": 4, "channels": [8, 16], "hidden": 32, "flow_hidden": 16},
    "convdraw": {"name": "convdraw", "steps": 2, "z_channels": 2, "hidden": 8},
}


def _finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)
    elif isinstance(obj, float):
        yield obj


@pytest.mark.parametrize("model", sorted(MODELS))
def test_geco_eval_writes_every_field_finite(tmp_path, geco_cli, model):
    doc = {**copy.deepcopy(TINY), "model": MODELS[model]}
    doc["train"]["steps"] = 10
    run = train(config=Config.from_dict(doc), run_dir=tmp_path / "run")
    out = geco_cli("eval", run, "--examples", 64, "--marginal-examples", 32)
    assert out.returncode == 0, out.stderr
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 10 and report["model"] == model
    assert report["sigma_opt"]["value"] > 0
    assert report["sigma_opt"]["examples"] == 256 - 25  # the training shapes but the validation tenth
    assert report["nll"]["bits_per_dim"] == pytest.approx(report["nll"]["nats_per_pixel"] / math.log(2))
    assert report["nll"]["nats_per_pixel"] > 0
    assert report["average_kl"]["examples"] == 64
    mk = report["marginal_kl"]
    assert mk["examples"] == 32 and mk["samples"] == 32 and mk["mutual_information"] <= math.log(32) + 1e-6
    assert report["constraints"][0]["kappa"] == 0.15 and "heldout_reached" in report["constraints"][0]
    numbers = list(_finite_numbers(report))
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert "marginal KL" in out.stdout and "bits/dim" in out.stdout


def test_eval_is_reproducible_and_changes_nothing_in_the_run(tmp_path):
    from test_training import digest

    from geco_core.evaluation import evaluate_run

    run = train(config=config(train={"steps": 10}), run_dir=tmp_path / "run")
    before = digest(run)
    a = evaluate_run(run, examples=64, marginal_examples=16, write=False)
    b = evaluate_run(run, examples=64, marginal_examples=16, write=False)
    assert a == b
    assert digest(run) == before


def test_sigma_opt_is_the_per_pixel_rms_residual_of_one_posterior_draw(tmp_path):
    """Against a direct computation: one forward pass of the same examples with the same seed."""
    from geco_core.evaluation import sigma_opt
    from geco_core.training import CHECKPOINT, build, load_checkpoint

    run = train(config=config(train={"steps": 10}), run_dir=tmp_path / "run")
    exp = build(config(train={"steps": 10}))
    exp.load_state_dict(load_checkpoint(run / CHECKPOINT))
    index = torch.randperm(len(exp.data), generator=torch.Generator().manual_seed(0))[:100]
    torch.manual_seed(5)
    got = sigma_opt(exp, exp.data, index)
    torch.manual_seed(5)
    exp.model.eval()
    with torch.no_grad():
        batch = exp.data.batch(index)
        x_hat = exp.model(batch.x).x_hat
    residual = (batch.x.double() - x_hat.double()).numpy().ravel()
    assert got == pytest.approx(math.sqrt(sum(r * r for r in residual) / len(residual)), rel=1e-9)


def test_eval_of_a_folder_without_a_run_is_a_one_line_error(tmp_path, geco_cli):
    out = geco_cli("eval", tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is not a run folder" in out.stderr


@needs_mnist
def test_geco_eval_on_conditional_convdraw_reports_the_marginal_kl_as_not_defined(tmp_path, geco_cli):
    doc = {
        **copy.deepcopy(TINY),
        "data": {"name": "mnist-sum"},
        "model": {"name": "conditional-convdraw", "steps": 2, "z_channels": 2, "hidden": 8},
    }
    doc["train"]["steps"] = 4
    run = train(config=Config.from_dict(doc), run_dir=tmp_path / "run")
    out = geco_cli("eval", run, "--examples", 64)
    assert out.returncode == 0, out.stderr
    report = json.loads((run / "eval.json").read_text())
    assert report["nll"]["split"] == "test" and report["nll"]["examples"] == 64
    assert report["marginal_kl"] == {"nats": None, "reason": "conditional model: its prior depends on the context"}
    assert all(math.isfinite(v) for v in _finite_numbers(report))


def test_a_model_without_a_posterior_gets_its_marginal_kl_reported_as_undefined(tmp_path, monkeypatch):
    from geco_core.evaluation import evaluate_run
    from geco_core.models import VAE, GaussianVAE, Output

    def forward_without_exposing(self, x, context=None):
        q = DiagonalGaussian(*self.encoder(x).chunk(2, dim=-1))
        return Output(self.decoder(q.rsample()), q.kl_standard_normal())

    run = train(config=config(train={"steps": 4}), run_dir=tmp_path / "run")
    monkeypatch.setattr(GaussianVAE, "forward", forward_without_exposing)
    monkeypatch.setattr(GaussianVAE, "posterior", VAE.posterior)  # what the VAE base class answers
    monkeypatch.setattr(GaussianVAE, "kl", VAE.kl)  # its KL from a whole forward pass
    report = evaluate_run(run, examples=32, write=False)
    assert report["marginal_kl"] == {"nats": None, "reason": "model 'mlp-vae' does not expose its posterior"}


def test_the_single_pass_evaluation_equals_separate_passes_with_the_same_draws(tmp_path):
    """geco eval's one forward per held-out batch gives what separate NLL, RMSE and KL passes gave
    with the same draws; the average KL from the encoder alone equals the full model's."""
    from geco_core.evaluation import average_kl, evaluate_run, nll_per_pixel, sigma_opt
    from geco_core.training import Run, build, evaluate_heldout

    run = train(config=config(train={"steps": 10}), run_dir=tmp_path / "run")
    report = evaluate_run(run, examples=96, marginal_examples=32, write=False, seed=3)
    exp = build(Run.open(run).config)
    exp.load_state_dict(Run.open(run).load_checkpoint())
    split, heldout = exp.heldout
    torch.manual_seed(3)
    sigma = sigma_opt(exp, exp.data, torch.randperm(len(exp.data), generator=torch.Generator().manual_seed(3))[:1000])
    assert report["sigma_opt"]["value"] == pytest.approx(sigma, rel=1e-12)
    torch.manual_seed(4)
    nats = nll_per_pixel(exp, heldout, torch.arange(96), sigma)
    torch.manual_seed(4)
    held = evaluate_heldout(exp, heldout, 96)
    assert report["nll"]["nats_per_pixel"] == pytest.approx(nats, rel=1e-12)
    assert report["heldout"]["rmse"] == pytest.approx(held["rmse"], rel=1e-12)
    assert report["heldout"]["kl"] == pytest.approx(held["kl"], rel=1e-12)
    index = torch.randperm(len(exp.data), generator=torch.Generator().manual_seed(4))[:96]
    with torch.no_grad():
        full = float(exp.model(exp.data.batch(index).x).kl.double().mean())
    assert report["average_kl"]["nats"] == pytest.approx(full, rel=1e-12)
    assert average_kl(exp, exp.data, index) == pytest.approx(full, rel=1e-12)


@given(st.integers(0, 10**6), st.integers(1, 40), st.integers(1, 30), st.integers(1, 8))
@settings(max_examples=25)
def test_the_gaussian_density_matrix_from_one_product_equals_the_expanded_formula(seed, n, m, d):
    g = torch.Generator().manual_seed(seed)
    mu, log_var = torch.randn(n, d, generator=g) * 2, torch.randn(n, d, generator=g)
    z = torch.randn(m, d, generator=g) * 3
    mu64, lv64, z64 = mu.double(), log_var.double(), z.double()
    precision = torch.exp(-lv64)  # the formula term by term, float64
    quad = precision @ z64.square().T - 2 * (mu64 * precision) @ z64.T
    const = (mu64.square() * precision + lv64).sum(1, keepdim=True) + d * math.log(2 * math.pi)
    expected = -0.5 * (quad + const)
    got = log_density_matrix(DiagonalGaussian(mu, log_var), n, z)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def _naive_log_aggregate(q: DiagonalGaussian, z: torch.Tensor) -> torch.Tensor:
    """Independent reference: for each z_j, a float64 logsumexp of log q(z_j | x_i) over all i."""
    q64, n = DiagonalGaussian(q.mu.double(), q.log_var.double()), len(z)
    return torch.stack([torch.logsumexp(q64.log_prob(z[j].double().expand(n, -1)), 0) for j in range(n)]) - math.log(n)


@given(
    seed=st.integers(0, 10**6),
    n=st.integers(2, 300),
    d=st.integers(1, 6),
    tile=st.integers(1, 80),
    narrow=st.floats(1e-4, 1.0),
    wide_share=st.floats(0.0, 1.0),
)
@example(seed=0, n=2, d=2, tile=1, narrow=1e-4, wide_share=0.0)  # the product form's round-off: 5e-11
@settings(max_examples=30, deadline=None)
def test_the_screened_aggregate_density_equals_a_naive_loop_to_round_off(seed, n, d, tile, narrow, wide_share):
    """Whatever the mix of narrow posteriors (most blocks screened out) and wide ones (tiles reduced
    whole), any n (blocks padded) and any tile: log q_n(z_j) and log q(z_j | x_j) as a naive loop,
    to the float64 round-off of the product form."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
    wide = torch.rand(n, 1, generator=g, dtype=torch.float64) < wide_share
    log_var = torch.where(wide, 0.0, math.log(narrow)) + torch.randn(n, d, generator=g, dtype=torch.float64) * 0.3
    q = DiagonalGaussian(mu, log_var)
    z = mu + (0.5 * log_var).exp() * torch.randn(n, d, generator=g, dtype=torch.float64)
    log_q, own = log_aggregate_density(q, n, z, tile)
    # the product form [z^2 | z | 1] . [-p/2 | mu p | c] cancels terms of size (|z| + |mu|)^2 p: its
    # float64 round-off is at most (2d + 1) eps times their sum
    terms = float((mu.abs().amax() + z.abs().amax()) ** 2 * (-log_var).exp().amax() * d)
    atol = (2 * d + 1) * 2.2e-16 * terms + 1e-12
    torch.testing.assert_close(log_q, _naive_log_aggregate(q, z), rtol=1e-12, atol=atol)
    torch.testing.assert_close(own, q.log_prob(z), rtol=1e-12, atol=atol)


def test_the_aggregate_density_of_a_flow_posterior_equals_a_loop_over_its_pairs():
    q = _flow_posterior(70, seed=4)
    with torch.no_grad():
        z = q.sample()
        log_q, own = log_aggregate_density(q, 70, z, tile=16)
        loop = _loop_over_pairs(q, 70, z)  # (i, j)
    torch.testing.assert_close(log_q, torch.logsumexp(loop, 0) - math.log(70))
    torch.testing.assert_close(own, loop.diagonal())


@pytest.mark.parametrize("spread", [0.05, 3.0], ids=["narrow posteriors", "wide posteriors"])
def test_marginal_kl_equals_a_naive_float64_loop_to_round_off(spread):
    """The blocked matrix products and the log-mean-exp that skips negligible terms give what a loop
    over every z_j (float64 logsumexp over all n examples) gives, to float64 round-off, whether most
    terms are negligible (narrow posteriors) or none is (wide)."""
    n, d = 700, 5
    g = torch.Generator().manual_seed(11)
    mu = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    log_var = (torch.rand(n, d, generator=g, dtype=torch.float64) * spread).log()

    class Model:
        def posterior(self, x, context=None):
            return DiagonalGaussian(x[:, :d], x[:, d:])

        def prior_log_prob(self, z, context=None):
            return -0.5 * (z.square() + math.log(2 * math.pi)).sum(-1)

    torch.manual_seed(5)
    got = marginal_kl(Model(), torch.cat([mu, log_var], 1), columns=128)
    torch.manual_seed(5)
    z = DiagonalGaussian(mu, log_var).sample()
    terms = []
    for j in range(n):
        log_q_j = torch.logsumexp(DiagonalGaussian(mu, log_var).log_prob(z[j].expand(n, d)), 0) - math.log(n)
        terms.append(log_q_j - Model().prior_log_prob(z[j]))
    assert got["marginal_kl"] == pytest.approx(float(torch.stack(terms).mean()), rel=1e-12, abs=1e-12)
