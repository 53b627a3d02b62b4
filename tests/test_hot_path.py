"""The training step's hot path: no host sync on a step that does not log, and the same training
as before it (the divergence tests in test_robustness.py are the other half)."""

from __future__ import annotations

import collections
import copy
import traceback

import pytest
import torch
from helpers import records
from hypothesis import given, settings
from hypothesis import strategies as st
from test_training import TINY, config
from torch.overrides import TorchFunctionMode

from geco_core.optim import step_if_finite
from geco_core.training import Callback, Config, train

#: what turns a tensor into a Python value, and so makes the host wait for the device
CONVERSIONS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "__format__", "__repr__"}


class HostReads(TorchFunctionMode):
    """Records every tensor-to-Python conversion while active, with where it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in CONVERSIONS:
            frame = traceback.extract_stack()[-2]
            self.seen[f"{func.__name__} at {frame.filename.split('/')[-1]}:{frame.lineno}"] += 1
        return func(*args, **(kwargs or {}))


class Window(Callback):
    """Watches the steps after ``first`` up to ``last`` (none of which logs or checkpoints)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.spy = first, last, HostReads()

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.first:
            self.spy.__enter__()
        elif trainer.step == self.last:
            self.spy.__exit__(None, None, None)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_step_that_does_not_log_never_reads_a_tensor_on_the_host(tmp_path, clip):
    """Thirty steps of GECO with the restart controller (which jumps: the optimiser follows on the
    device), with and without gradient clipping: not one conversion of a tensor to Python."""
    window = Window(first=5, last=35)
    cfg = config(
        model={"name": "conv-vae", "latent_dim": 4, "channels": [8, 16], "hidden": 32},
        objective={"name": "geco", "geco": {"alpha": 0.9, "controller": "restart"}},
        train={"steps": 50, "log_every": 40, "checkpoint_every": 40, "validate_every": 45, "grad_clip": clip},
    )
    train(config=cfg, run_dir=tmp_path / "run", extra_callbacks=[window])
    assert sum(window.spy.seen.values()) == 0, dict(window.spy.seen)


def test_the_check_would_see_a_host_read():
    spy = HostReads()
    with spy:
        loss = torch.tensor(2.0)
        if torch.isfinite(loss):
            float(loss)
    assert sum(spy.seen.values()) == 2


@pytest.mark.parametrize("fused", [True, False])
def test_step_if_finite_steps_on_finite_values_and_leaves_everything_as_it_was_otherwise(fused):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=fused)

    def step(scale: float) -> bool:
        loss = layer(torch.ones(1, 3)).sum() * scale
        opt.zero_grad()
        loss.backward()
        return bool(step_if_finite(opt, loss))

    assert step(1.0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    moments = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    assert not step(float("nan")) and not step(float("inf"))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    for kept, now in zip(moments, opt.state.values()):
        assert all(torch.equal(v, now[k]) for k, v in kept.items())  # moments and the step count too
    assert step(1.0) and not torch.equal(before["weight"], layer.weight)
    assert not hasattr(opt, "found_inf")


@settings(max_examples=40, deadline=None)
@given(
    scales=st.lists(st.floats(-8, 30), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
    fused=st.booleans(),
)
def test_adam_state_stays_finite_whatever_the_size_of_finite_gradients(scales, seed, fused):
    """Steps with gradients of any finite size (up to 1e30 per entry, whose squares overflow
    float32) through ``step_if_finite``: a step is taken exactly when every squared entry is
    finite (the 2-norm is), and after every step Adam's weights, moments and second moment are
    finite. This is what lets the loop go without checking the optimiser's state."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (7, 3)]
    opt = torch.optim.Adam(weights, lr=1e-2, fused=fused)
    for scale in scales:
        grads = [torch.randn(w.shape, generator=gen) * 10.0**scale for w in weights]
        for w, g in zip(weights, grads):
            w.grad = g
        squares_finite = all(bool(torch.isfinite(g.double().square().float()).all()) for g in grads)
        norm_finite = bool(torch.isfinite(torch.stack([g.double().square().sum() for g in grads]).sum().float()))
        took = bool(step_if_finite(opt, torch.tensor(1.0)))
        assert took == norm_finite and (not took or squares_finite)
        held = [*weights, *(v for s in opt.state.values() for v in s.values())]
        assert all(bool(torch.isfinite(v).all()) for v in held)


# --- the whole step compiled ---------------------------------------------------------------------

CONV = {"name": "conv-vae", "latent_dim": 4, "channels": [8, 16], "hidden": 32}
MAE = [{"name": "test-mae", "kappa": 0.15}]
DIGITS = {"name": "shapes", "n": 256, "size": 28, "channels": 1}  # 28 x 28 grey: what CLA and FRE read
CASES = {
    "mlp-vae": ({"name": "mlp-vae", "latent_dim": 4, "hidden": [64]}, [{"name": "test-mae", "kappa": 0.15}], None),
    "conv-vae": (CONV, [{"name": "test-mae", "kappa": 0.15}], None),
    "vae-nvp": (
        {**CONV, "name": "vae-nvp", "flow_layers": 2, "flow_hidden": 16},
        [{"name": "test-mae", "kappa": 0.15}],
        None,
    ),
    "convdraw": (
        {"name": "convdraw", "steps": 2, "z_channels": 2, "hidden": 8},
        [{"name": "test-mae", "kappa": 0.15}],
        None,
    ),
    "re+re-per-pixel": (CONV, [{"name": "re", "kappa": 0.1}, {"name": "re", "kappa": 0.3, "per": "pixel"}], None),
    "pncc": (CONV, [{"name": "pncc", "kappa": 0.8}], None),
    "cla": (CONV, [{"name": "cla", "kappa": 0.9}], DIGITS),
    "fre": (CONV, [{"name": "fre", "kappa": 0.4}], DIGITS),
}


def compiled_and_eager(tmp_path, monkeypatch, model, constraints, data, backend="eager"):
    """The records of the same 4 steps trained eagerly and with ``train.compile``, and what was
    compiled (with which options)."""
    real, calls = torch.compile, []

    def spy(fn=None, **options):
        calls.append((getattr(fn, "__name__", type(fn).__name__), options))
        return real(fn, **{**options, "backend": backend})

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    runs = {}
    for flag in (False, True):
        doc = copy.deepcopy(TINY)
        doc.update(model=model, constraints=constraints, **({"data": data} if data else {}))
        doc["train"].update(steps=4, compile=flag, log_every=1)
        runs[flag] = records(train(config=Config.from_dict(doc), run_dir=tmp_path / str(flag)))
    return runs, calls


@pytest.mark.parametrize("case", list(CASES))
def test_train_compile_compiles_the_whole_step_with_no_graph_break_and_trains_as_eager(tmp_path, monkeypatch, case):
    """Model, objective, GECO (with its update and the restart controller) and the constraints in
    one graph (fullgraph=True: a graph break would be an error), for every shipped model and
    constraint; the same losses and multipliers as eager, step by step (Dynamo's eager backend:
    the captured graph run as it is)."""
    model, constraints, data = CASES[case]
    if any(c["name"] != "test-mae" for c in constraints):
        pytest.importorskip("geco_re")
    runs, calls = compiled_and_eager(tmp_path, monkeypatch, model, constraints, data)
    assert calls == [("eager_loss", {"fullgraph": True})]
    for a, b in zip(runs[False], runs[True], strict=True):
        for key in ("loss", "kl", "rmse", *(k for k in a if k.endswith("/lambda"))):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_the_compiled_step_through_inductor_trains_as_eager_to_float_tolerance(tmp_path, monkeypatch):
    """Inductor's generated kernels (C++ on a CPU) instead of the captured graph: the same
    training to float32 round-off (with torch's own random numbers for the posterior draws)."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    model, constraints, data = CASES["conv-vae"]
    runs, _ = compiled_and_eager(tmp_path, monkeypatch, model, constraints, data, backend="inductor")
    first, compiled = runs[False][0], runs[True][0]
    assert compiled["loss"] == pytest.approx(first["loss"], rel=1e-5)  # the same weights: round-off only
    for a, b in zip(runs[False], runs[True], strict=True):  # then the updates' round-off adds up
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3) and b["kl"] == pytest.approx(a["kl"], rel=1e-3)


def test_fre_with_its_cache_cannot_be_compiled_whole_and_says_so():
    pytest.importorskip("geco_fre")
    from geco_core import ConfigError
    from geco_core.training import build

    cfg = config(
        model=CONV, data=DIGITS, constraints=[{"name": "fre", "kappa": 0.4, "cache": True}], train={"compile": True}
    )
    with pytest.raises(ConfigError, match="train.compile: constraint 'fre' cannot be compiled"):
        build(cfg)
