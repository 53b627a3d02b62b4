"""The multiplier controllers: properties of every one, each one's own rule against its closed form,
restarts and the optimiser that follows them, plateaus reported as unreachable, and GECO's state
matched by component name."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from geco_core import GECO, Batch, ConfigError, Constraint, registry
from geco_core.controllers import Controller
from geco_core.geco import LOG_LAMBDA_LIMIT


class Values(Constraint):
    """Values are whatever the test puts in ``batch.x_hat``; declared scales."""

    def __init__(self, name: str = "v", dim: int = 1, multiplier_scale: float = 1.0, value_scale: float = 1.0):
        super().__init__()
        self.name, self.dim, self.kappa, self.units = name, dim, 0.5, "test units"
        self.multiplier_scale, self.value_scale = multiplier_scale, value_scale

    def forward(self, batch: Batch) -> torch.Tensor:
        return batch.x_hat


def make(controller, dims=(1,), scales=(1.0,), value_scales=None, **kwargs) -> GECO:
    value_scales = value_scales or [1.0] * len(dims)
    stack = [Values(f"c{i}", d, s, v) for i, (d, s, v) in enumerate(zip(dims, scales, value_scales))]
    return GECO(stack, controller=controller, dtype=torch.float64, **kwargs)


def step(geco: GECO, c) -> torch.Tensor:
    values = torch.as_tensor(c, dtype=torch.float64).reshape(1, -1)
    return geco.lagrangian(torch.zeros(1, dtype=torch.float64), values)


CONTROLLERS = registry().names("controller")
finite = st.floats(-1e30, 1e30, allow_nan=False)


def test_every_shipped_controller_is_registered_with_a_description():
    assert {"paper", "scaled", "restart", "nupi", "ramp"} <= set(CONTROLLERS)
    for name in CONTROLLERS:
        entry = registry().get("controller", name)
        assert issubclass(entry.factory, Controller) and entry.description


@pytest.mark.parametrize("name", CONTROLLERS)
@given(seq=st.lists(st.lists(finite, min_size=2, max_size=2), min_size=1, max_size=40), scale=st.floats(1e-6, 1e9))
def test_lambda_stays_positive_finite_and_inside_the_guard_for_any_finite_input(name, seq, scale):
    geco = make(name, dims=(2,), scales=(scale,))
    for c in seq:
        loss = step(geco, c)
        lam = geco.lambdas
        assert torch.isfinite(lam).all() and (lam > 0).all()
        assert (geco.log_lambdas.abs() <= LOG_LAMBDA_LIMIT + 1e-9).all()
        assert not torch.isnan(loss)


@pytest.mark.parametrize("name", CONTROLLERS)
def test_eval_mode_and_non_finite_values_change_no_controller_state(name):
    geco = make(name, dims=(2,), scales=(100.0,))
    step(geco, [0.3, -0.2])
    kept = [k for k, v in geco.state_dict().items() if torch.is_tensor(v) and k not in ("c_hat", "skipped")]
    before = {k: geco.state_dict()[k].clone() for k in kept}
    step(geco, [math.nan, 0.1])
    assert int(geco.skipped) == 1
    geco.eval()
    step(geco, [5.0, 5.0])
    after = geco.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    state = {k: v for k, v in after.items() if torch.is_tensor(v) and v.is_floating_point() and k != "c_hat"}
    assert all(torch.isfinite(v).all() for v in state.values())  # checkpoints refuse non-finite states


def test_paper_is_algorithm_1_whatever_the_scales():
    geco = make("paper", dims=(1,), scales=(1e6,), value_scales=[1e-3], lr=0.5, alpha=0.0)
    assert geco.lambdas.item() == 1.0  # lambda_init, not the natural scale
    for c in (0.2, -0.1, 0.4):
        step(geco, [c])
    assert geco.lambdas.item() == pytest.approx(math.exp(0.5 * (0.2 - 0.1 + 0.4)))


@given(st.floats(-5, 5), st.integers(1, 60), st.floats(1e-3, 0.2), st.floats(1e-3, 1e6), st.floats(1e-3, 10))
def test_scaled_starts_from_the_natural_scale_and_moves_by_the_clipped_relative_violation(c, t, step_size, scale, vs):
    spec = {"name": "scaled", "step": step_size, "patience": 0, "start": 0.01, "clip": 2.0, "margin": 0.0}
    geco = make(spec, scales=(scale,), value_scales=[vs], alpha=0.0)
    assert geco.lambdas.item() == pytest.approx(0.01 * scale)
    for _ in range(t):
        step(geco, [c])
    e = max(-1.0, min(2.0, c / vs))
    expected = min(math.log(0.01 * scale) + t * step_size * e, math.log(scale * 100))  # max_factor 100
    assert geco.log_lambdas.item() == pytest.approx(max(-LOG_LAMBDA_LIMIT, min(LOG_LAMBDA_LIMIT, expected)), abs=1e-9)


@given(st.lists(st.floats(-0.9, 0.9), min_size=1, max_size=40), st.floats(0, 10), st.floats(0.1, 3), st.floats(0, 0.9))
def test_nupi_equals_its_closed_form(seq, kp, ki, nu):
    """log lambda_t = log lambda_0 + step * (ki * sum_s e_s + kp * (xi_t - e_0)), xi an EMA of e."""
    spec = {"name": "nupi", "kp": kp, "ki": ki, "nu": nu, "step": 0.1, "patience": 0, "start": 1.0, "margin": 0.0}
    geco = make(spec, alpha=0.0)
    xi = None
    for e in seq:
        step(geco, [e])
        xi = e if xi is None else nu * xi + (1 - nu) * e
    expected = 0.1 * (ki * sum(seq) + kp * (xi - seq[0]))
    assert geco.log_lambdas.item() == pytest.approx(expected, abs=1e-9)


def test_nupi_on_a_constant_violation_integrates_linearly_after_its_first_step():
    geco = make({"name": "nupi", "kp": 5.0, "ki": 1.0, "step": 0.01, "patience": 0, "margin": 0.0}, alpha=0.0)
    logs = []
    for _ in range(10):
        step(geco, [0.5])
        logs.append(geco.log_lambdas.item())
    diffs = [b - a for a, b in zip(logs, logs[1:])]
    assert all(d == pytest.approx(0.01 * 0.5) for d in diffs)


@pytest.mark.parametrize("restart_to", ["start", "midway"])
def test_restart_drops_lambda_once_when_a_violated_component_turns_satisfied(restart_to):
    spec = {"name": "restart", "step": 0.5, "patience": 0, "restart_to": restart_to, "start": 1.0, "margin": 0.0}
    geco = make(spec, dims=(2,), scales=(10.0,), alpha=0.0)
    for _ in range(5):
        step(geco, [1.0, 1.0])  # both violated: lambda climbs by e^0.5 a step
    assert geco.lambdas == pytest.approx(torch.full((2,), 10.0 * math.exp(2.5), dtype=torch.float64))
    assert not bool(geco.restarted)
    step(geco, [-0.5, 1.0])  # the first turns satisfied and restarts, the second goes on
    peak = math.log(10.0) + 2.5 - 0.25  # where its update would have taken it
    restarted = math.log(10.0) if restart_to == "start" else (math.log(10.0) + peak) / 2
    assert geco.log_lambdas[0].item() == pytest.approx(restarted)
    assert geco.lambdas[1].item() == pytest.approx(10.0 * math.exp(3.0))
    assert bool(geco.restarted) and geco.state().components[0].extra == {"restarted": 1.0}
    step(geco, [1.0, 1.0])
    step(geco, [-0.5, 1.0])  # satisfied again: no second restart
    assert not bool(geco.restarted)
    assert geco.log_lambdas[0].item() == pytest.approx(restarted + 0.5 - 0.25)


def test_restart_never_fires_for_a_component_satisfied_from_the_start():
    geco = make({"name": "restart", "patience": 0}, alpha=0.0)
    for _ in range(5):
        step(geco, [-0.3])
        assert not bool(geco.restarted)


@pytest.mark.parametrize("fused", [True, False])
def test_follow_resets_the_optimisers_state_after_a_restart_as_clearing_it_would(fused):
    """After the step in which a multiplier restarts, Adam continues exactly as one whose state was
    cleared (``state.clear()``, the fresh start), and before and after it exactly as one left alone;
    decided on the device."""
    torch.manual_seed(0)
    model, reference = nn.Linear(3, 1), nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.1, fused=fused)
    geco = make({"name": "restart", "step": 0.5, "patience": 0, "margin": 0.0}, alpha=0.0)

    def train_step(c: float) -> None:
        weight = geco.lambdas.item()
        for m, o in ((model, opt), (reference, ref_opt)):
            loss = m(torch.ones(1, 3)).sum() * weight
            o.zero_grad()
            loss.backward()
            o.step()
        step(geco, [c])
        geco.follow(opt)
        if bool(geco.restarted):
            ref_opt.state.clear()

    for c in (1.0, 1.0, -1.0, -1.0, 1.0):
        train_step(c)
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    steps = [float(s["step"]) for s in opt.state.values()]
    assert steps == [2.0, 2.0]  # two steps since the restart at the third
    paper = make("paper")
    before = {k: v.clone() for k, v in opt.state[next(iter(opt.state))].items()}
    paper.follow(opt)  # paper never jumps, never resets
    assert all(torch.equal(v, opt.state[next(iter(opt.state))][k]) for k, v in before.items())


def test_a_stalled_violated_component_stops_lambda_growing_and_is_reported_unreachable():
    geco = make({"name": "scaled", "step": 0.1, "patience": 20, "tolerance": 0.01, "margin": 0.0}, alpha=0.0)
    for _ in range(10):
        step(geco, [0.5])  # improving? no: constant and violated
    rising = geco.log_lambdas.item()
    for _ in range(30):
        step(geco, [0.5])
    held = geco.log_lambdas.item()
    assert held < rising + 0.1 * 0.5 * 30  # it did not go on climbing
    for _ in range(5):
        step(geco, [0.5])
    assert geco.log_lambdas.item() == pytest.approx(held)
    (state,) = geco.state().components
    assert state.unreachable and state.status == "unreachable"
    assert state.best == pytest.approx(0.5) and state.best_step == 0
    step(geco, [0.2])  # it improves again: lambda may move
    assert geco.state().components[0].unreachable is False
    step(geco, [0.2])
    assert geco.log_lambdas.item() > held


@pytest.mark.parametrize("name", ["scaled", "restart", "nupi"])
def test_a_met_constraint_that_drifts_back_above_kappa_is_not_unreachable(name):
    """The patience counts from the last time the component was satisfied: a constraint that was
    met, and is violated for fewer than ``patience`` updates, keeps pushing lambda up, although no
    violation can beat the value it had when it was met. A violation that then stalls is caught."""
    geco = make({"name": name, "step": 0.1, "patience": 20, "tolerance": 0.01, "margin": 0.0}, alpha=0.0)
    for _ in range(10):
        step(geco, [-0.5])  # met
    for _ in range(18):
        step(geco, [0.3])  # violated, constant: 27 updates after the best value, 18 after it was met
    assert geco.state().components[0].unreachable is False
    before = geco.log_lambdas.item()
    step(geco, [0.3])
    assert geco.log_lambdas.item() > before  # still rising
    for _ in range(5):
        step(geco, [0.3])
    (state,) = geco.state().components  # now 24 updates without a better violation: stalled
    assert state.unreachable and state.best == pytest.approx(0.3)


@pytest.mark.parametrize("controller", ["scaled", "paper", "restart"])
def test_the_normalised_formulation_divides_the_lagrangian_whatever_the_controller(controller):
    """The formulation is chosen apart from the controller (as Cooper does): any controller's
    lambda, the normalised loss; the default is Algorithm 1's Lagrangian."""
    geco = make(controller, dims=(1, 1), scales=(2.0, 8.0), formulation="normalised")
    plain = make(controller, dims=(1, 1), scales=(2.0, 8.0))
    assert plain.formulation.name == "lagrangian" and geco.formulation.name == "normalised"
    geco.eval()
    lam = geco.lambdas
    values = torch.tensor([[0.3, -0.1]], dtype=torch.float64)
    loss = geco.lagrangian(torch.tensor([4.0], dtype=torch.float64), values)
    expected = (4.0 + (lam * values[0]).sum()) / (1 + (lam / torch.tensor([2.0, 8.0], dtype=torch.float64)).sum())
    assert loss.item() == pytest.approx(expected.item())
    with pytest.raises(ConfigError, match="formulation must be one of lagrangian, normalised, got 'cooper'"):
        make(controller, formulation="cooper")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("pid", "unknown controller 'pid'"),
        ({"step": 0.1}, "controller needs a name"),
        ({"name": "scaled", "step": -1.0}, "step must be > 0"),
        ({"name": "restart", "restart_to": "zero"}, "restart_to must be start or midway"),
        ({"name": "scaled", "max_factor": 0.5}, "max_factor must be >= 1"),
        ({"name": "nupi", "nu": 1.0}, "0 <= nu < 1"),
        ({"name": "restart", "stepp": 0.1}, "unknown argument 'stepp'"),
        (3, "controller must be a name"),
    ],
)
def test_a_bad_controller_is_a_one_line_config_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        make(spec)


def test_a_third_party_controller_is_found_through_the_registry(monkeypatch):
    class Halving(Controller):
        """Halves log lambda every step (a test controller)."""

        name = "halving"

        def update(self, log_lambdas, signals):
            return log_lambdas / 2, torch.zeros((), dtype=torch.bool)

    entries = dict(registry().entries["controller"])
    monkeypatch.setitem(registry().entries, "controller", {**entries, "halving": _entry(Halving)})
    geco = make("halving", lambda_init=16.0)
    step(geco, [1.0])
    assert geco.lambdas.item() == pytest.approx(4.0)


def _entry(factory):
    from geco_core.plugins import Entry

    return Entry("controller", factory.name, factory, "test", "test", "0", "test controller")


# --- state by name -------------------------------------------------------------------------------


@pytest.mark.parametrize("controller", ["paper", "nupi", "restart"])
def test_state_loads_into_the_same_stack_in_another_order_matched_by_name(controller):
    a = GECO([Values("re"), Values("cla", 2), Values("pncc")], controller=controller)
    for c in ([0.3, 0.1, -0.2, 0.05], [0.2, 0.4, -0.1, 0.0], [-0.1, 0.2, 0.3, 0.1]):
        a.lagrangian(torch.zeros(1), torch.tensor([c]))
    b = GECO([Values("pncc"), Values("re"), Values("cla", 2)], controller=controller)
    b.load_state_dict(a.state_dict())
    ra, rb = a.state().flat(), b.state().flat()
    assert set(ra) == set(rb)
    for key, value in ra.items():
        assert rb[key] == pytest.approx(value), key  # every component's lambda, c_ma, ... by name


def test_state_of_another_stack_is_refused_with_one_line():
    a = GECO([Values("re"), Values("pncc")])
    b = GECO([Values("re"), Values("cla")])
    with pytest.raises(ConfigError, match=r"GECO state holds the components \[re, pncc\], this GECO has \[re, cla\]"):
        b.load_state_dict(a.state_dict())


def test_split_and_constraints_by_name_follow_the_stack():
    geco = GECO([Values("re"), Values("cla", 3), Values("re")])
    assert list(geco.stack.by_name) == ["re", "cla", "re#2"]
    parts = geco.stack.split(torch.arange(5.0))
    assert {k: v.tolist() for k, v in parts.items()} == {"re": [0.0], "cla": [1.0, 2.0, 3.0], "re#2": [4.0]}
    assert geco.component_names == ["re", "cla[0]", "cla[1]", "cla[2]", "re#2"]
    with pytest.raises(ValueError, match="last dimension of 5"):
        geco.stack.split(torch.zeros(2, 4))


def test_a_constraint_lacking_part_of_the_contract_is_named():
    class Bare:
        name, dim = "bare", 1

        def __call__(self, batch):
            return batch.x_hat

    with pytest.raises(
        ConfigError, match="lacks kappa, units, multiplier_scale, value_scale, component_names, reached"
    ):
        GECO([Bare()])


@pytest.mark.parametrize("name", ["scaled", "restart", "nupi"])
def test_scale_aware_controllers_need_no_tuning_across_constraint_scales(name):
    """The same relative violations drive multipliers whose scales differ by 1e8 the same way."""
    small = make(name, scales=(1e-3,), value_scales=[1e-4])
    large = make(name, scales=(1e5,), value_scales=[10.0])
    for e in (2.0, 1.0, 0.5, -0.2, 0.1):
        step(small, [e * 1e-4])
        step(large, [e * 10.0])
    ratio = (small.log_lambdas - math.log(1e-3)) - (large.log_lambdas - math.log(1e5))
    assert ratio.abs().item() < 1e-9


def test_a_run_with_a_kappa_no_model_can_reach_ends_unreachable_with_lambda_held(tmp_path):
    """MAE <= 1e-4 is out of reach of a model that (with a learning rate of 1e-7) barely learns: the
    run says so (summary, records, the table) with the best value and when it was reached, and
    lambda stops growing."""
    from test_training import config

    from geco_core.training import Run, train
    from geco_core.training.summary import format_summary

    controller = {"name": "restart", "patience": 30, "tolerance": 0.05}
    cfg = config(
        objective={"name": "geco", "geco": {"alpha": 0.9, "controller": controller}},
        constraints=[{"name": "test-mae", "kappa": 1e-4}],
        train={"steps": 150, "log_every": 5, "lr": 1e-7},
    )
    run = Run.open(train(config=cfg, run_dir=tmp_path / "run"))
    (row,) = run.read_summary()["constraints"]
    assert row.status == "unreachable" and 0 <= row.best_step < 150 and row.best > 1e-4
    records = run.read_metrics()
    assert records[-1]["test-mae/unreachable"] == 1.0
    held = [r["test-mae/lambda"] for r in records if r["step"] > row.best_step + 30]
    assert held and max(held) <= held[0] * (1 + 1e-6)  # no growth once stalled
    assert f"unreachable (best {row.best:.4g} at step {row.best_step})" in format_summary(run.read_summary())


# --- the typed state -----------------------------------------------------------------------------


class RMSE(Values):
    """Values as a mean squared error minus kappa^2: ``reached`` maps them back to an RMSE."""

    def reached(self, values):
        return (values + self.kappa**2).clamp_min(0).sqrt()


@pytest.mark.parametrize("name", CONTROLLERS)
@given(seq=st.lists(st.lists(st.floats(-0.2, 0.5), min_size=3, max_size=3), min_size=1, max_size=30))
def test_the_state_is_one_record_per_component_equal_to_the_buffers(name, seq):
    """Every field of each component's record is what GECO's buffers hold (an independent read of
    each buffer, float64), beta is 1/lambda, reached maps c_ma back, the flat keys are the report."""
    geco = GECO([RMSE("re"), Values("cla", 2)], controller=name, dtype=torch.float64, alpha=0.5)
    for c in seq:
        step(geco, c)
    state = geco.state()
    assert [c.name for c in state.components] == ["re", "cla[0]", "cla[1]"]
    assert [c.constraint for c in state.components] == ["re", "cla", "cla"]
    assert state.step == int(geco.step) == len(seq) and state.skipped == 0
    for j, c in enumerate(state.components):
        assert c.c_ma == geco.c_ma[j].item() and c.c_hat == geco.c_hat[j].item()
        assert c.lambda_ == geco.lambdas[j].item() and c.beta == pytest.approx(1 / c.lambda_)
        assert c.kappa == 0.5 and c.units == "test units"
        assert c.status in ("met", "at bound", "violated", "unreachable")
        assert (c.status == "met") == (c.c_ma <= 0)
    assert state.components[0].reached == pytest.approx(math.sqrt(max(0.0, geco.c_ma[0].item() + 0.25)))
    assert state.components[1].reached is None  # the constraint maps nothing back


def test_a_satisfied_component_has_no_best_value_nor_step_where_the_report_had_sentinels():
    """The controller's 'none yet' (float max) never leaks: while a component is satisfied its best
    value and step are None (and absent from the flat keys); while violated they are the best
    value in kappa's units and the update it was reached at."""
    geco = make({"name": "restart", "patience": 5, "margin": 0.0}, alpha=0.0)
    step(geco, [0.3])
    step(geco, [0.1])
    (violated,) = geco.state().components
    assert violated.best == pytest.approx(0.1) and violated.best_step == 1 and violated.unreachable is False
    step(geco, [-0.2])
    (met,) = geco.state().components
    assert met.status == "met" and met.best is None and met.best_step is None
    assert not {"c0/best", "c0/best_step"} & set(geco.state().flat())


def test_a_component_whose_last_batch_was_not_finite_is_diverged():
    geco = make("restart")
    step(geco, [0.1])
    step(geco, [math.nan])
    assert geco.state().components[0].status == "diverged" and geco.state().skipped == 1
