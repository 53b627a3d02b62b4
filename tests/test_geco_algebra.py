"""The algebra of GECO (Algorithm 1), pinned against naive float64 loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from geco_core import GECO, Batch, ConfigError, Constraint, NonFiniteConstraintError
from geco_core.geco import LOG_LAMBDA_LIMIT


class Values(Constraint):
    """A constraint whose values are whatever the test puts in ``batch.x_hat``."""

    def __init__(self, name: str = "v", dim: int = 1) -> None:
        super().__init__()
        self.name, self.dim = name, dim

    def forward(self, batch: Batch) -> torch.Tensor:
        return batch.x_hat


def make_geco(dims=(1,), **kwargs) -> GECO:
    """Algorithm 1 exactly (the ``paper`` controller) over constraints of the given sizes, float64."""
    kwargs.setdefault("controller", "paper")
    return GECO([Values(f"c{i}", d) for i, d in enumerate(dims)], dtype=torch.float64, **kwargs)


def step(geco: GECO, c_hat, kl=0.0) -> torch.Tensor:
    """One training step with a batch of one example whose constraint values are ``c_hat``."""
    values = torch.as_tensor(c_hat, dtype=torch.float64).reshape(1, -1)
    return geco.lagrangian(torch.tensor([kl], dtype=torch.float64), values)


finite = st.floats(-1e30, 1e30, allow_nan=False)
moderate = st.floats(-1.0, 1.0, allow_nan=False)
alphas = st.floats(0.0, 0.999)


@given(
    st.lists(st.lists(finite, min_size=2, max_size=2), min_size=1, max_size=40),
    st.floats(1e-3, 10.0),
    st.floats(1e-6, 1.0),
    st.floats(1.0, 1e6),
)
def test_lambda_stays_positive_and_finite_with_bounds(seq, lr, lo, hi):
    geco = make_geco(dims=(2,), lr=lr, lambda_min=lo, lambda_max=hi)
    for c in seq:
        step(geco, c)
        lam = geco.lambdas
        assert torch.isfinite(lam).all() and (lam > 0).all()
        assert (lam >= lo * (1 - 1e-12)).all() and (lam <= hi * (1 + 1e-12)).all()


@given(st.lists(finite, min_size=1, max_size=60), st.floats(1e-3, 10.0))
def test_lambda_stays_positive_and_finite_by_default(seq, lr):
    # float32 buffers, no bounds: even violations of 1e30 per step never overflow lambda to inf
    geco = GECO([Values()], controller="paper", lr=lr)
    for c in seq:
        geco.lagrangian(torch.zeros(1), torch.tensor([[c]]))
        assert torch.isfinite(geco.lambdas).all() and (geco.lambdas > 0).all()
        assert torch.isfinite(geco.lambdas * geco.c_ma.clamp(-1e3, 1e3)).all()


@given(st.lists(st.lists(moderate, min_size=3, max_size=3), min_size=1, max_size=30), alphas)
def test_moving_average_follows_recursion_from_first_value(seq, alpha):
    geco = make_geco(dims=(3,), alpha=alpha)
    expected = None
    for c in seq:
        step(geco, c)
        c = torch.tensor(c, dtype=torch.float64)
        expected = c if expected is None else alpha * expected + (1 - alpha) * c
        torch.testing.assert_close(geco.c_ma, expected, rtol=1e-12, atol=1e-12)


@given(st.lists(moderate, min_size=1, max_size=30), alphas, moderate)
def test_moving_average_starts_from_ma_init_when_given(seq, alpha, ma_init):
    geco = make_geco(alpha=alpha, ma_init=ma_init)
    expected = ma_init
    for c in seq:
        step(geco, [c])
        expected = alpha * expected + (1 - alpha) * c
        assert geco.c_ma.item() == pytest.approx(expected, abs=1e-12)


@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
@settings(max_examples=25, deadline=None)
def test_straight_through_value_is_c_ma_and_gradient_is_that_of_c_hat(seed, steps):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    geco = make_geco(dims=(2, 1), alpha=0.9, lr=0.3)
    for _ in range(steps):
        x = torch.randn(8, 5, dtype=torch.float64)
        values = model(x)  # (8, 3): per-example values of a 2-component and a 1-component constraint
        lambdas = geco.lambdas.clone()
        loss = geco.lagrangian(torch.zeros(8, dtype=torch.float64), values)
        # value: lambda^(t-1) . c_ma^t
        assert loss.item() == pytest.approx((lambdas * geco.c_ma).sum().item(), rel=1e-12, abs=1e-12)
        # gradient: that of lambda^(t-1) . c_hat^t
        got = torch.autograd.grad(loss, list(model.parameters()))
        want = torch.autograd.grad((lambdas * model(x).mean(0)).sum(), list(model.parameters()))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@given(
    st.lists(moderate, min_size=2, max_size=2),
    st.integers(1, 200),
    st.floats(1e-3, 0.5),
    st.floats(0.1, 10.0),
    st.sampled_from([None, 0.0]),
    alphas,
)
def test_lambda_closed_form_under_constant_c_hat(c, t, lr, lambda0, ma_init, alpha):
    """lambda_t = lambda_0 * exp(lr * sum_{s<=t} c_ma^s); with c_ma^0 = c it is lambda_0 * exp(lr*c*t),
    with c_ma^(-1) = 0 it is lambda_0 * exp(lr * c * sum_s (1 - alpha^(s+1))), until log lambda meets
    the overflow guard (log lambda is monotone under a constant c, so clamping once equals clamping
    every step)."""
    geco = make_geco(dims=(2,), lr=lr, lambda_init=lambda0, ma_init=ma_init, alpha=alpha)
    for _ in range(t):
        step(geco, c)
    c = torch.tensor(c, dtype=torch.float64)
    if ma_init is None:
        total = c * t
    else:
        total = c * sum(1 - alpha ** (s + 1) for s in range(t))
    log_lambda = (math.log(lambda0) + lr * total).clamp(-LOG_LAMBDA_LIMIT, LOG_LAMBDA_LIMIT)
    torch.testing.assert_close(geco.lambdas, log_lambda.exp(), rtol=1e-9, atol=0)


def test_per_constraint_step_sizes_scale_each_multiplier():
    geco = make_geco(dims=(1, 2), lr=[0.1, 2.0])
    for _ in range(10):
        step(geco, [0.5, 0.5, -0.25])
    want = torch.exp(torch.tensor([0.1 * 0.5, 2.0 * 0.5, 2.0 * -0.25], dtype=torch.float64) * 10)
    torch.testing.assert_close(geco.lambdas, want)


@given(st.lists(st.tuples(moderate, st.floats(0, 50)), min_size=1, max_size=20))
def test_loss_uses_lambda_from_previous_step(seq):
    geco = make_geco(alpha=0.5, lr=0.7)
    for c, kl in seq:
        lambda_before = geco.lambdas.item()
        loss = step(geco, [c], kl=kl)
        assert loss.item() == pytest.approx(kl + lambda_before * geco.c_ma.item(), rel=1e-12, abs=1e-12)
        assert geco.lambdas.item() == pytest.approx(lambda_before * math.exp(0.7 * geco.c_ma.item()))


@given(st.lists(moderate, min_size=1, max_size=10), st.lists(moderate, min_size=1, max_size=10))
def test_eval_mode_changes_no_buffer(train_seq, eval_seq):
    geco = make_geco()
    for c in train_seq:
        step(geco, [c])
    before = {k: v.clone() for k, v in geco.state_dict().items() if isinstance(v, torch.Tensor)}
    geco.eval()
    for c in eval_seq:
        loss = step(geco, [c], kl=1.0)
        assert loss.item() == pytest.approx(1.0 + geco.lambdas.item() * c)
    for k, v in before.items():
        assert torch.equal(geco.state_dict()[k], v), k


@given(st.lists(moderate, min_size=2, max_size=30), st.data())
def test_save_load_continue_equals_uninterrupted_run(seq, data):
    cut = data.draw(st.integers(1, len(seq) - 1))
    kwargs = dict(alpha=0.8, lr=0.5, warmup=3, lambda_max=50.0)
    straight = make_geco(**kwargs)
    for c in seq:
        step(straight, [c])
    first = make_geco(**kwargs)
    for c in seq[:cut]:
        step(first, [c])
    resumed = make_geco(**kwargs)
    resumed.load_state_dict(first.state_dict())
    for c in seq[cut:]:
        step(resumed, [c])
    for k, v in straight.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(resumed.state_dict()[k], v), k


def test_warmup_holds_lambda_while_the_moving_average_moves():
    geco = make_geco(warmup=3, lr=1.0)
    for t in range(3):
        step(geco, [0.5 + t])
        assert geco.lambdas.item() == 1.0
    assert geco.c_ma.item() != 0.5
    step(geco, [0.5])
    assert geco.lambdas.item() == pytest.approx(math.exp(geco.c_ma.item()))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_is_skipped_and_counted(bad):
    geco = make_geco(dims=(2,))
    step(geco, [0.3, 0.1])
    before = {k: geco.state_dict()[k].clone() for k in ("log_lambdas", "c_ma", "step")}
    step(geco, [bad, 0.2])
    for k, v in before.items():
        assert torch.equal(geco.state_dict()[k], v), k
    assert int(geco.skipped) == 1 and geco.state().flat()["geco/skipped"] == 1.0
    step(geco, [0.3, 0.1])  # and training goes on from where it was
    assert int(geco.step) == 2


def test_first_finite_batch_initialises_the_moving_average_after_a_skip():
    geco = make_geco()
    step(geco, [math.nan])
    step(geco, [0.25])
    assert geco.c_ma.item() == 0.25


def test_strict_mode_raises_on_non_finite_value():
    geco = make_geco(strict=True)
    step(geco, [0.1])
    with pytest.raises(NonFiniteConstraintError, match="c0=nan"):
        step(geco, [math.nan])
    assert int(geco.skipped) == 0 and int(geco.step) == 1


def test_report_gives_c_hat_c_ma_lambda_and_beta_per_component():
    geco = GECO([Values("re"), Values("cla", 2), Values("re")], controller="paper", alpha=0.5)
    geco.lagrangian(torch.zeros(2), torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.3, 0.0, 0.1, 0.6]]))
    geco.lagrangian(torch.zeros(1), torch.tensor([[0.0, 0.0, 0.0, 0.0]]))
    r = geco.state().flat()
    assert geco.component_names == ["re", "cla[0]", "cla[1]", "re#2"]
    assert r["re/c_hat"] == 0.0 and r["re/c_ma"] == pytest.approx(0.1)
    assert r["cla[0]/c_ma"] == pytest.approx(0.05) and r["re#2/c_ma"] == pytest.approx(0.25)
    for name in geco.component_names:
        assert r[f"{name}/beta"] == pytest.approx(1 / r[f"{name}/lambda"])
    assert r["geco/step"] == 2.0


def test_wrong_number_of_values_is_a_clear_error():
    geco = make_geco(dims=(2,))
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        geco.lagrangian(torch.zeros(3), torch.zeros(3, 3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(lambda_init=0.0), "lambda_init"),
        (dict(lambda_min=0.0), "lambda_min"),
        (dict(lambda_min=2.0, lambda_max=1.0), "lambda_max"),
        (dict(warmup=-1), "warmup"),
        (dict(lr=[1.0, 2.0, 3.0]), "lr needs one value"),
    ],
)
def test_bad_options_fail_naming_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_geco(**kwargs)


class Columns(Constraint):
    """Returns columns ``start:start+dim`` of ``batch.x_hat``."""

    def __init__(self, name: str, start: int, dim: int) -> None:
        super().__init__()
        self.name, self.start, self.dim = name, start, dim

    def forward(self, batch: Batch) -> torch.Tensor:
        return batch.x_hat[:, self.start : self.start + self.dim]


def test_forward_stacks_constraints_in_order():
    geco = GECO([Columns("b", 2, 2), Columns("a", 0, 1)], controller="paper")
    x_hat = torch.randn(4, 5)
    values = geco.evaluate(Batch(x=torch.zeros(4, 5), x_hat=x_hat))
    assert torch.equal(values, x_hat[:, [2, 3, 0]])
    loss = geco(torch.zeros(4), Batch(x=torch.zeros(4, 5), x_hat=x_hat))
    assert loss.item() == pytest.approx(x_hat[:, [2, 3, 0]].mean(0).sum().item(), rel=1e-6)


def test_a_constraint_returning_the_wrong_shape_is_named():
    geco = GECO([Columns("wide", 0, 1)])
    geco.stack.dims = [2]  # the constraint claims one component more than it returns
    with pytest.raises(ValueError, match="'wide' returned shape"):
        geco.evaluate(Batch(x=torch.zeros(4, 5), x_hat=torch.zeros(4, 5)))


def test_log_lambda_is_guarded_so_that_neither_the_loss_nor_adams_state_can_overflow():
    geco = GECO([Values()], controller="paper", lr=10.0, alpha=0.0)
    for _ in range(20):
        geco.lagrangian(torch.zeros(1), torch.tensor([[1.0]]))
    assert geco.log_lambdas.item() == pytest.approx(LOG_LAMBDA_LIMIT) and geco.lambdas.item() <= 1.0001e12
    # lambda * C finite for |C| up to 3e26; Adam's second moment (lambda * grad)^2 finite for |grad| up to 1.8e7
    assert torch.isfinite(geco.lambdas * 3e26).all()
    assert torch.isfinite((geco.lambdas * 1.8e7) ** 2).all()
    for _ in range(20):
        geco.lagrangian(torch.zeros(1), torch.tensor([[-1.0]]))
    assert geco.log_lambdas.item() == pytest.approx(-LOG_LAMBDA_LIMIT) and geco.lambdas.item() > 0
