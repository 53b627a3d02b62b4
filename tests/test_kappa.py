"""Choosing kappa: the finder (its ramp, its analysis, its curve against a closed-form frontier), the
validation split and the generalisation gap GECO aims by, kappa in dB, the warning for a kappa
below a finder's floor, and the independent judge of learned constraints."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import needs_plugins, run_geco
from test_training import TINY, config

from geco_core import GECO, ConfigError, create_constraint
from geco_core.controllers import Ramp
from geco_core.data import ImageData
from geco_core.evaluation import kappa as finder
from geco_core.geco import CONFIDENCE
from geco_core.models.base import DiagonalGaussian, Output
from geco_core.models.vae import GaussianVAE
from geco_core.plugins import Entry, registry
from geco_core.training import Config, Run, train

# --- the ramp ------------------------------------------------------------------------------------


def test_the_ramp_climbs_as_restart_does_holds_then_falls_exponentially():
    ramp = Ramp(steps=1000, start=1e-3, rate=0.05, high=100.0, hold=0.5, low=3e-3)
    factor = lambda step: float(ramp.factor(torch.tensor(float(step))))  # noqa: E731
    assert factor(0) == pytest.approx(1e-3) and factor(10) == pytest.approx(1e-3 * math.exp(0.5))
    climb = math.log(100 / 1e-3) / 0.05  # updates to the top
    assert factor(math.ceil(climb)) == pytest.approx(100.0) and factor(499) == pytest.approx(100.0)
    assert factor(500) == pytest.approx(100.0) and factor(999) == pytest.approx(3e-3)
    middle = 500 + (999 - 500) / 2  # halfway down in log lambda
    assert factor(middle) == pytest.approx(math.sqrt(100.0 * 3e-3))
    with pytest.raises(ConfigError, match="ramp needs"):
        Ramp(steps=10, high=1.0, low=2.0)


# --- the analysis --------------------------------------------------------------------------------


@pytest.mark.parametrize("v_inf, a, b", [(0.06, 0.8, 0.5), (0.9, -0.5, 0.7), (0.2, 3.0, 1.2)])
def test_the_floor_is_the_learning_curve_extrapolated_to_the_budget(v_inf, a, b):
    points = [(t, v_inf + a * t**-b) for t in range(500, 1001, 40)]
    floor, fit = finder._power_law_floor(points, 2000)
    assert floor == pytest.approx(v_inf + a * 2000**-b, rel=1e-3)
    assert fit["b"] == pytest.approx(b, abs=0.05)
    assert finder._power_law_floor(points[:3], 2000) == (None, {})  # too few points to fit


def test_the_envelope_keeps_for_each_value_the_least_kl_of_any_point_at_least_as_tight():
    points = [(0.10, 30.0), (0.09, 45.0), (0.095, 50.0), (0.12, 20.0), (0.11, 35.0), (0.08, 60.0)]
    assert finder._envelope(points, -1) == [(0.12, 20.0), (0.10, 30.0), (0.09, 45.0), (0.08, 60.0)]
    higher = [(0.8, 5.0), (0.9, 12.0), (0.85, 20.0), (0.95, 30.0)]  # a lower bound (pNCC): higher is tighter
    assert finder._envelope(higher, 1) == [(0.8, 5.0), (0.9, 12.0), (0.95, 30.0)]


def test_the_knee_is_where_a_further_percent_costs_more_than_knee_percent_of_kl():
    """On KL = c * v^-E: elasticity E per 1%; the knee sits where E crosses KNEE / 1%."""
    steep = 2 * math.log(1 + finder.KNEE) / math.log(1.01)  # twice the knee's elasticity
    mild = 0.5 * math.log(1 + finder.KNEE) / math.log(1.01)
    values = [0.2 * 0.97**i for i in range(30)]  # loose to tight, 3% apart
    knee_at = values[15]

    def kl(v: float) -> float:
        mild_part = (min(v, values[0]) / values[0]) ** -mild if v >= knee_at else (knee_at / values[0]) ** -mild
        return 10 * mild_part * (min(v, knee_at) / knee_at) ** -steep

    kls = [kl(v) for v in values]
    assert finder._knee(list(zip(values, kls)), 0.0) == pytest.approx(knee_at)


def test_the_floor_is_never_looser_than_a_value_the_run_measured_nor_the_suggestion_tighter_than_it():
    """A model that keeps learning on the way down (the quickstart's shapes) measures there a value
    tighter than the held part's extrapolated floor: that value was reached, so it is the floor,
    and no suggestion or table entry lies beyond it."""
    held = [{"step": s, "values": {"re": 0.08 + 0.5 * s**-0.5}, "kl": 120.0} for s in range(50, 1001, 50)]
    down = [0.065 + 0.006 * i for i in range(20)]  # tight to loose while lambda falls
    ramp = [
        {"step": 1000 + 50 * (i + 1), "values": {"re": v}, "kl": 100.0 * 0.8**i, "factor": 100 * 0.5**i}
        for i, v in enumerate(down)
    ]
    meta = {"re": {"units": "rmse", "kappa": 0.1, "tighter": -1, "perfect": 0.0}}
    (result,) = finder.analyse(held + ramp, meta, budget=2000, hold_steps=1000).values()
    extrapolated = 0.08 + 0.5 * 2000**-0.5
    assert result.floor == pytest.approx(0.065) and 0.065 < extrapolated
    assert result.suggested_kappa >= result.floor
    assert all(row.kappa >= result.floor - 1e-3 for row in result.table)  # 3 digits
    assert finder.predict_kl(result, 0.064) is None  # tighter than anything reached: out of reach


@pytest.mark.parametrize("steps", [40, 300, 1000, 2000, 6000])
def test_the_ramp_reaches_its_hold_within_a_quarter_of_any_finder_and_keeps_the_restart_rate_when_it_can(steps):
    options = finder.ramp_options(steps)
    ramp = Ramp(**options)
    top = math.ceil(math.log(options["high"] / options["start"]) / options["rate"])
    assert top <= finder.CLIMB * steps + 1 < options["hold"] * steps
    assert float(ramp.factor(torch.tensor(float(top)))) == pytest.approx(options["high"])
    assert options["rate"] == (finder.RATE if steps >= 1000 else pytest.approx(math.log(1e5) / (0.25 * steps)))
    with pytest.raises(ConfigError, match=f"at least {finder.MIN_STEPS} steps"):
        finder.ramp_options(finder.MIN_STEPS - 1)


def test_a_floor_never_passes_perfect_and_is_not_extrapolated_beyond_what_the_finder_supports():
    """A learning curve still falling steeply (RMSE 0.4 t^-0.3 - 0.06 crosses 0 before the budget;
    a correlation 1.1 - 0.5 t^-0.3 crosses 1) extrapolates past perfection: the floor stops at the
    perfect value. A budget further than REACH times the held part gets no number, and the table
    says so and how long a finder would tell."""
    steps = range(10, 151, 10)
    within = finder.REACH * 150
    assert 0.4 * within**-0.3 - 0.06 < 0 < 0.4 * 150**-0.3 - 0.06
    held = [{"step": s, "values": {"re": 0.4 * s**-0.3 - 0.06}, "kl": 120.0} for s in steps]
    down = [
        {"step": 150 + 10 * i, "values": {"re": 0.1 + 0.01 * i}, "kl": 100.0 * 0.8**i, "factor": 100 * 0.5**i}
        for i in range(1, 16)
    ]
    meta = {"re": {"units": "rmse", "kappa": 0.1, "tighter": -1, "perfect": 0.0}}
    (near,) = finder.analyse(held + down, meta, budget=within, hold_steps=150).values()
    assert near.floor_status == "extrapolated" and near.floor == 0.0
    (far,) = finder.analyse(held + down, meta, budget=within + 1, hold_steps=150).values()
    assert far.floor is None and far.floor_status == "cannot tell"
    assert far.table and far.table[0].kappa == pytest.approx(far.floor_measured, rel=1e-2)
    fake = finder.KappaResult(
        folder=None,
        config_fingerprint=None,
        settings=None,
        budget=within + 1,
        finder_steps=300,
        hold_steps=150,
        knee=finder.KNEE,
        constraints={"re": far},
        points=(),
    )
    text = finder.format_result(fake)
    assert (
        "cannot tell at this length" in text
        and f"--steps {math.ceil((within + 1) / (finder.REACH * finder.HOLD))} or more" in text
    )
    meta = {"pncc": {"units": "r", "kappa": 0.9, "tighter": 1, "perfect": 1.0}}
    rising = [{"step": s, "values": {"pncc": 1.1 - 0.5 * s**-0.3}, "kl": 50.0} for s in steps]
    (capped,) = finder.analyse(rising, meta, budget=within, hold_steps=150).values()
    assert capped.floor == 1.0 and capped.floor_status == "extrapolated"


def test_the_default_finder_is_long_enough_for_its_floor_to_reach_the_budget():
    assert finder.default_steps(600) == 600 and finder.default_steps(2000) == finder.FINDER_STEPS
    assert finder.default_steps(5000) == finder.FINDER_STEPS and finder.default_steps(10_000) == 4000
    for budget in (600, 3000, 10_000, 50_000):
        assert budget <= finder.REACH * finder.HOLD * finder.default_steps(budget)


def test_predictions_interpolate_the_way_down_log_linearly_correct_it_and_say_where_they_come_from():
    result = finder.Finding(
        units="rmse",
        kappa=0.1,
        tighter=-1,
        perfect=0.0,
        floor=0.06,
        floor_status="extrapolated",
        floor_measured=0.065,
        fit={},
        kl_at_high=150.0,
        suggested_kappa=None,
        curve=((0.2, 5.0), (0.1, 20.0), (0.07, 80.0)),
    )
    cases = {
        0.15: (math.exp((math.log(5) + math.log(20)) / 2), "interpolated"),
        0.085: (math.exp((math.log(20) + math.log(80)) / 2), "interpolated"),
        0.3: (5.0, "looser than measured"),
        0.065: (150.0, "held"),  # between the curve and the floor: lambda held high
    }
    for kappa, (way_down, where) in cases.items():
        p = finder.predict(result, kappa)
        assert p.way_down == pytest.approx(way_down) and p.where == where
        if where == "held":
            assert p.kl == pytest.approx(finder.HELD * way_down)
        else:  # a GECO run finds a path a few nats cheaper than the way down
            assert p.kl == pytest.approx(max(finder.SLOPE * way_down - finder.OFFSET, finder.MIN_SHARE * way_down))
        low, high = finder.INTERVALS[where]
        assert p.low == pytest.approx(low * p.kl) and p.high == pytest.approx(high * p.kl)
        assert finder.predict_kl(result, kappa) == p.kl
    assert finder.predict(result, 0.05) == finder.Prediction(None, "out of reach")
    assert finder.predict_kl(result, 0.05) is None


def test_the_frugal_kappa_pays_half_the_knees_kl():
    """The way down pays 10 + 0.2 v^-4: little at loose values, ever steeper as v tightens; the
    frugal kappa is predicted to pay half the knee's KL, at the v the closed form gives."""
    values = [0.6 * 0.98**i for i in range(90)]  # loose to tight
    kl = lambda v: 10 + 0.2 * v**-4.0  # noqa: E731
    down = [{"step": 1001 + i, "values": {"re": v}, "kl": kl(v), "factor": 1.0} for i, v in enumerate(values)]
    held = [{"step": s, "values": {"re": values[-1]}, "kl": 500.0, "factor": 100.0} for s in (500, 750, 1000)]
    meta = {"re": {"units": "rmse", "kappa": 0.1, "tighter": -1, "perfect": 0.0}}
    (c,) = finder.analyse(held + down, meta, budget=1000, hold_steps=1000).values()
    knee, frugal = c.suggested_kappa, c.frugal_kappa
    assert values[-1] < knee < frugal < values[0]
    half = 0.5 * finder.predict_kl(c, knee)
    assert finder.predict_kl(c, frugal) == pytest.approx(half, rel=1e-6)
    way_down = (half + finder.OFFSET) / finder.SLOPE  # the way down's KL there
    assert frugal == pytest.approx((0.2 / (way_down - 10)) ** 0.25, rel=1e-3)


# --- the finder against a closed-form frontier ---------------------------------------------------

STDS = (0.12, 0.08, 0.05, 0.03)  # the source's standard deviations (pixels) along 4 directions of 16


def gaussian_source(split: str = "train", seed: int = 0, n: int | None = None) -> ImageData:
    """x = 0.5 + A s, s ~ N(0, diag(STDS^2)), A 16 x 4 orthonormal: 1 x 4 x 4 images (uint8)."""
    g = torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(16, len(STDS), generator=g))
    g.manual_seed(seed * 2 + (split == "test"))
    n = n or (20_000 if split == "train" else 2000)
    x = 0.5 + (torch.randn(n, len(STDS), generator=g) * torch.tensor(STDS)) @ basis.T
    return ImageData(images=(x.clamp(0, 1) * 255).round().to(torch.uint8).view(n, 1, 4, 4))


class LinearVAE(GaussianVAE):
    """A linear Gaussian VAE (probabilistic PCA's): q(z|x) = N(W x + c, diag(v)), x_hat = V z + b."""

    name = "linear-vae"

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 4) -> None:
        super().__init__(image_shape)
        self.latent_dim, size = latent_dim, math.prod(image_shape)
        self.encode, self.decode = torch.nn.Linear(size, latent_dim), torch.nn.Linear(latent_dim, size)
        self.log_var = torch.nn.Parameter(torch.zeros(latent_dim))

    def posterior(self, x, context=None):
        mu = self.encode(x.flatten(1) - 0.5)
        return DiagonalGaussian(mu, self.log_var.expand_as(mu))

    def _logits(self, z):  # the identity through the sigmoid: x_hat = V z + b
        return torch.logit((0.5 + self.decode(z)).clamp(1e-4, 1 - 1e-4)).view(-1, *self.image_shape)

    def forward(self, x, context=None):
        q = self.posterior(x)
        return Output(self._logits(q.rsample()), q.kl_standard_normal())

    def sample_logits(self, n, context=None):
        return self._logits(torch.randn(n, self.latent_dim))


def rate_distortion(mse: float, variances: list[float]) -> float:
    """R(D) of a Gaussian source, nats, at ``mse`` per pixel (reverse water-filling: D = sum min(theta,
    variance), R = sum over variances above theta of log(variance / theta) / 2)."""
    total = mse * len(variances)
    low, high = 0.0, max(variances)
    for _ in range(200):
        theta = (low + high) / 2
        low, high = (theta, high) if sum(min(theta, v) for v in variances) < total else (low, theta)
    return sum(0.5 * math.log(v / theta) for v in variances if v > theta)


def register(monkeypatch, kind: str, name: str, factory) -> None:
    """Register ``factory`` as the ``kind`` called ``name`` for this test."""
    monkeypatch.setitem(registry().entries[kind], name, Entry(kind, name, factory, "test", "test", "0", name))


@needs_plugins
def test_the_finders_curve_follows_the_distortion_rate_curve_of_a_gaussian_source(tmp_path, monkeypatch):
    """A linear Gaussian VAE on a Gaussian source can reach R(D), the closed-form least KL at each
    distortion: no point of the finder's curve beats it, and the curve stays close to it."""
    register(monkeypatch, "dataset", "gaussian-source", gaussian_source)
    register(monkeypatch, "model", "linear-vae", LinearVAE)
    doc = {
        "data": {"name": "gaussian-source"},
        "model": {"name": "linear-vae"},
        "objective": {"name": "geco", "geco": {"alpha": 0.9}},
        "constraints": [{"name": "re", "kappa": 0.03}],
        "train": {"steps": 6000, "batch_size": 64, "lr": 1e-2},
        "logging": {"progress": False, "dir": str(tmp_path)},
    }
    pixels = gaussian_source().images.float().view(-1, 16) / 255
    variances = torch.linalg.eigvalsh(torch.cov(pixels.T)).clamp(min=1e-9).tolist()
    result = finder.find_kappa(config=Config.from_dict(doc), run_dir=tmp_path / "finder")
    curve = [{"value": v, "kl": k} for v, k in result.constraint("re").curve]
    assert len(curve) >= 5
    for point in curve:
        bound = rate_distortion(point["value"] ** 2, variances)
        assert point["kl"] >= bound - 0.15, (point, bound)  # nothing beats the closed form (noise aside)
    middle = [p for p in curve if 0.2 <= rate_distortion(p["value"] ** 2, variances) <= 6]
    assert len(middle) >= 3
    for point in middle:
        assert point["kl"] <= 1.3 * rate_distortion(point["value"] ** 2, variances) + 0.3, point


# --- kappa held on held-out data: the validation split and the gap ------------------------------


def test_the_validation_split_is_drawn_by_seed_and_never_trained_on():
    data = ImageData(images=torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1), labels=torch.arange(50))
    rest, held = data.split(7, seed=3)
    again = data.split(7, seed=3)[1]
    assert torch.equal(held.images, again.images) and not torch.equal(held.images, data.split(7, seed=4)[1].images)
    together = torch.cat([rest.images.flatten(), held.images.flatten()]).sort().values
    assert len(held) == 7 and len(rest) == 43 and torch.equal(together, data.images.flatten())
    assert torch.equal(held.labels, held.images.flatten().long())  # labels travel with their images


def test_an_experiment_trains_on_all_but_its_validation_examples(tmp_path):
    from geco_core.training import build

    exp = build(config(train={"validation": 20}))
    whole = config(train={"validation": 0})
    assert len(exp.validation) == 20 and len(exp.data) == 256 - 20 and len(build(whole).data) == 256
    assert len(build(config(train={"validation": 1000})).validation) == 25  # at most a tenth


class Values(torch.nn.Module):
    """A constraint whose per-example values are ``batch.x_hat``; reached = value + kappa."""

    name, units, kappa, dim, multiplier_scale, value_scale = "v", "u", 0.5, 2, 1.0, 1.0
    component_names = ["v[0]", "v[1]"]

    def forward(self, batch):
        return batch.x_hat

    def reached(self, values):
        return values + self.kappa


def test_the_gap_is_the_validation_bound_above_the_moving_average_and_tightens_the_target():
    """gap = mean + CONFIDENCE * stderr - c_ma over the validation values (then averaged with the
    gap so far); the controller sees c_ma + gap, the status follows it; Algorithm 1 is unchanged
    without validation."""
    geco = GECO([Values()], controller="paper", alpha=0.0, lr=1.0, dtype=torch.float64)
    geco.lagrangian(torch.zeros(1, dtype=torch.float64), torch.tensor([[-0.1, 0.2]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    first = torch.randn(400, 2, generator=g, dtype=torch.float64) * torch.tensor([0.3, 0.1]) + 0.05
    geco.validate(first)
    bound = first.mean(0) + CONFIDENCE * first.std(0) / math.sqrt(400)
    torch.testing.assert_close(geco.gap, bound - torch.tensor([-0.1, 0.2], dtype=torch.float64))
    second = torch.randn(100, 2, generator=g, dtype=torch.float64)
    geco.validate(second)
    again = second.mean(0) + CONFIDENCE * second.std(0) / math.sqrt(100) - geco.c_ma
    torch.testing.assert_close(geco.gap, ((bound - torch.tensor([-0.1, 0.2])) + again) / 2)
    before = geco.log_lambdas.clone()
    geco.lagrangian(torch.zeros(1, dtype=torch.float64), torch.tensor([[0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(geco.log_lambdas, before + geco.gap)  # paper: log lambda += lr * (c_ma + gap)
    state = geco.state()
    assert [c.gap for c in state.components] == geco.gap.tolist()
    assert [c.status == "met" for c in state.components] == (geco.gap <= 0).tolist()
    kept = geco.gap.clone()
    geco.validate(torch.full((10, 2), math.nan, dtype=torch.float64))  # ignored
    assert torch.equal(geco.gap, kept)


def test_a_constraint_declares_its_own_validation_confidence():
    """Each component's bound uses its constraint's ``validation_confidence``; the others GECO's
    (:data:`CONFIDENCE` unless given)."""

    class Narrow(Values):
        validation_confidence = 0.5

    values = torch.randn(300, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for options, default in (({}, CONFIDENCE), ({"validation_confidence": 2.5}, 2.5)):
        geco = GECO([Values(), Narrow()], controller="paper", alpha=0.0, dtype=torch.float64, **options)
        geco.validate(values)
        z = torch.tensor([default, default, 0.5, 0.5], dtype=torch.float64)
        torch.testing.assert_close(geco.gap, values.mean(0) + z * values.std(0) / math.sqrt(300))

    class Negative(Values):
        validation_confidence = -1.0

    with pytest.raises(ConfigError, match="validation_confidence must be >= 0"):
        GECO([Negative()])


def test_a_gecos_state_from_before_validation_loads_with_no_gap():
    geco = GECO([Values()], controller="paper")
    state = {k: v for k, v in geco.state_dict().items() if k not in ("gap", "validated")}
    fresh = GECO([Values()], controller="paper")
    fresh.gap.fill_(1.0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.gap, torch.zeros(2)) and not bool(fresh.validated)


# --- kappa in dB, the warning, unreachable explained, the twin -----------------------------------


@needs_plugins
def test_re_takes_kappa_as_a_psnr_in_db_and_reports_both_units():
    by_psnr = create_constraint("re", kappa_psnr=20.0, image_shape=(1, 4, 4))
    assert by_psnr.kappa == pytest.approx(0.1) and by_psnr.also.convert(0.1) == pytest.approx(20.0)
    assert by_psnr.also.invert(30.0) == pytest.approx(10**-1.5) and by_psnr.also.format(0.1) == " (20.0 dB)"
    for bad in ({"kappa": 0.1, "kappa_psnr": 20.0}, {}):
        with pytest.raises(ConfigError, match="re: give kappa .* or kappa_psnr"):
            create_constraint("re", **bad)
    with pytest.raises(ConfigError, match="kappa_psnr must be a PSNR in dB > 0"):
        create_constraint("re", kappa_psnr=-3.0)


@needs_plugins
def test_a_summary_shows_kappa_and_the_reached_values_in_db_beside_the_rmse(tmp_path):
    from geco_core.training.summary import format_summary

    cfg = config(constraints=[{"name": "re", "kappa_psnr": 20.0}], train={"steps": 10})
    run = train(config=cfg, run_dir=tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    (row,) = summary["constraints"]
    assert row["kappa"] == pytest.approx(0.1) and row["kappa_psnr"] == pytest.approx(20.0)
    assert row["heldout_reached_psnr"] == pytest.approx(-20 * math.log10(row["heldout_reached"]))
    assert "data_reached" not in row  # the data reach RE's perfect value (RMSE 0, float32 aside): no data line
    text = format_summary(Run.open(run).read_summary())
    assert f"0.1000 (20.0 dB)  {row['reached']:.4f} ({row['reached_psnr']:.1f} dB)" in text


def test_the_fingerprint_is_the_data_model_and_constraint_stack_whatever_the_settings():
    base = config()
    assert finder.fingerprint(base) == finder.fingerprint(config(constraints=[{"name": "test-mae", "kappa": 0.5}]))
    assert finder.fingerprint(base) == finder.fingerprint(config(logging={"dir": "elsewhere"}))
    assert finder.fingerprint(base) == finder.fingerprint(config(train={"steps": 99}))  # kept in the result
    machine = {"threads": 1, "device": "cpu", "compile": True, "seed": 3, "log_every": 7, "checkpoint_every": 9}
    assert finder.fingerprint(base) == finder.fingerprint(config(train=machine))
    assert finder.settings(base) == finder.settings(config(train=machine))
    optimiser = config(train={"lr": 0.1, "batch_size": 16}, objective={"geco": {"alpha": 0.5, "controller": "paper"}})
    assert finder.fingerprint(base) == finder.fingerprint(optimiser)
    changed = {k for k, v in finder.settings(optimiser).items() if finder.settings(base).get(k) != v}
    assert changed == {"train.lr", "train.batch_size", "objective.geco.alpha", "objective.geco.lr"}
    assert finder.fingerprint(base) != finder.fingerprint(config(model={"latent_dim": 8}))
    assert finder.fingerprint(base) != finder.fingerprint(config(data={"n": 64}))
    two = [{"name": "test-mae", "kappa": 0.15}, {"name": "test-mae", "kappa": 0.2}]
    assert finder.fingerprint(base) != finder.fingerprint(config(constraints=two))


def test_find_kappa_writes_its_folder_and_geco_train_warns_of_a_kappa_below_its_floor(tmp_path):
    """The command as a user runs it: the finder's table, plot and result in a run folder; then
    geco train of the same config with a kappa tighter than that floor warns in one line (and
    trains), and one with a reachable kappa does not."""
    import tomli_w

    doc = {k: v for k, v in copy.deepcopy(TINY).items()}
    doc["train"] = {**doc["train"], "steps": 60}
    doc["logging"] = {"progress": False, "dir": str(tmp_path / "runs"), "eval_examples": 32}
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(doc))
    done = run_geco("find-kappa", path, "--steps", "40")
    assert done.returncode == 0, done.stderr
    assert "reachable floor at 60 steps" in done.stdout and "suggested kappa" in done.stdout
    (folder,) = (tmp_path / "runs").glob("kappa-tiny-*")
    result = json.loads((folder / "kappa.json").read_text())
    assert (folder / "kappa.png").stat().st_size > 5000 and (folder / "kappa.md").is_file()
    floor = result["constraints"]["test-mae"]["floor"]
    tight = run_geco("train", path, "--set", f"constraints.0.kappa={floor / 2}", "--set", "train.steps=2")
    assert tight.returncode == 0, tight.stderr
    warnings = [line for line in tight.stderr.splitlines() if line.startswith("geco: warning:")]
    assert len(warnings) == 1 and "tighter than the reachable floor" in warnings[0] and "geco find-kappa" in warnings[0]
    loose = run_geco("train", path, "--set", f"constraints.0.kappa={floor * 3}", "--set", "train.steps=2")
    assert loose.returncode == 0 and "geco: warning:" not in loose.stderr
    other = run_geco("train", path, "--set", f"constraints.0.kappa={floor / 2}", "--set", "train.steps=2",
                     "--set", "train.lr=0.0123")  # fmt: skip
    (warning,) = [line for line in other.stderr.splitlines() if line.startswith("geco: warning:")]
    assert "tighter than the reachable floor" in warning and "other settings: train.lr" in warning
    assert "(here 0.0123)" in warning


@needs_plugins
def test_the_floor_warning_compares_a_kappa_given_in_db_like_one_given_as_rmse(tmp_path):
    """RE's kappa_psnr = 30 (RMSE 0.0316) is tighter than a floor of 0.05 as kappa = 0.0316 is."""
    base = {"logging": {"dir": str(tmp_path), "progress": False}}
    as_db = config(constraints=[{"name": "re", "kappa_psnr": 30}], **base)
    as_rmse = config(constraints=[{"name": "re", "kappa": 0.0316}], **base)
    assert finder.fingerprint(as_db) == finder.fingerprint(as_rmse)
    found = finder.Finding(
        units="rmse", kappa=0.1, tighter=-1, perfect=0.0, floor=0.05, floor_status="extrapolated",
        floor_measured=0.055, fit={}, kl_at_high=None, suggested_kappa=0.06, curve=(),
    )  # fmt: skip
    result = finder.KappaResult(
        folder=None, config_fingerprint=finder.fingerprint(as_db), settings=None, budget=1000, finder_steps=400,
        hold_steps=200, knee=finder.KNEE, constraints={"re": found}, points=(),
    )  # fmt: skip
    assert finder.KappaResult.from_json(json.loads(json.dumps(result.to_json()))) == result  # kappa.json reads back
    (tmp_path / "kappa-tiny").mkdir()
    (tmp_path / "kappa-tiny" / "kappa.json").write_text(json.dumps(result.to_json()))
    (db,), (rmse,) = finder.below_floor(as_db), finder.below_floor(as_rmse)
    assert db.startswith("re: kappa 0.0316") and rmse.startswith("re: kappa 0.0316")
    loose = config(constraints=[{"name": "re", "kappa_psnr": 20}], **base)  # RMSE 0.1: above the floor
    assert finder.below_floor(loose) == []


def test_an_unreachable_kappa_is_explained_with_what_to_do(tmp_path):
    from geco_core.training.summary import format_summary

    controller = {"name": "restart", "patience": 30, "tolerance": 0.05}
    cfg = config(
        objective={"name": "geco", "geco": {"alpha": 0.9, "controller": controller}},
        constraints=[{"name": "test-mae", "kappa": 1e-4}],
        train={"steps": 120, "log_every": 5, "lr": 1e-7},
    )
    summary = Run.open(train(config=cfg, run_dir=tmp_path / "run")).read_summary()
    (line,) = summary["advice"]
    assert "test-mae: kappa 0.0001 is out of reach at this budget; the best it reached was" in line
    assert "geco find-kappa" in line and "train.steps" in line and "max_factor" in line
    assert line in format_summary(summary)


def test_a_kappa_still_violated_at_the_end_gets_the_same_remedies(tmp_path):
    """A constraint that was neither met nor stalled (still improving when the budget ran out) is
    `violated`, and the summary says what to do about it as for an unreachable one."""
    cfg = config(
        objective={"name": "geco", "geco": {"alpha": 0.9, "controller": "paper"}},
        constraints=[{"name": "test-mae", "kappa": 1e-4}],
        train={"steps": 20, "log_every": 5},
    )
    summary = json.loads((train(config=cfg, run_dir=tmp_path / "run") / "summary.json").read_text())
    (row,) = summary["constraints"]
    (line,) = summary["advice"]
    assert row["status"] == "violated"
    assert line.startswith(f"test-mae: kappa 0.0001 was not met in this run (reached {row['reached']:.4g})")
    assert "geco find-kappa" in line and "train.steps" in line and "max_factor" in line


@needs_plugins
def test_learned_constraints_have_an_independent_twin_that_summaries_report():
    """CLA's and FRE's shipped networks each have a twin (the same recipe, another seed), a
    different network (checksum verified), which judges the same reconstructions; weights of a
    user's own have none."""
    from geco_core import Batch

    cla = create_constraint("cla", kappa=0.9, image_shape=(1, 28, 28))
    twin = cla.twin()
    assert twin.weights == "twin" and twin.kappa == cla.kappa and twin.form == cla.form
    first = dict(cla.classifier.state_dict())
    assert any(not torch.equal(v, twin.classifier.state_dict()[k]) for k, v in first.items() if v.is_floating_point())
    x = torch.rand(4, 1, 28, 28)
    batch = Batch(x=x, x_hat=x, labels=torch.tensor([0, 1, 2, 3]))
    assert twin(batch).shape == cla(batch).shape == (4, 1)
    fre = create_constraint("fre", kappa=0.4, image_shape=(1, 28, 28))
    assert fre.twin().weights == "twin" and fre.twin().multiplier_scale == fre.multiplier_scale
    assert create_constraint("re", kappa=0.1).twin() is None
