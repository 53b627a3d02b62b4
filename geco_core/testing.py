"""The constraint contract as a reusable test kit, and a small constraint for tests.

For a plugin author, one import and one class run every check of the contract on your constraint::

    # tests/test_contract.py of your plugin
    from geco_core.testing import ConstraintContract

    class TestMyConstraint(ConstraintContract):
        name = "mae"                       # the registered name
        options = {"kappa": 0.05}          # a valid configuration
        image_shape = (1, 28, 28)
        distribution = "geco-mae"          # optional: the entry point must come from it

pytest collects the ``test_*`` methods: values of shape ``(B, dim)``; ``<= 0`` exactly where
``reached`` is on kappa's satisfied side (and ``reached(0) = kappa``); gradients reach ``x_hat`` and
never a frozen network's weights; frozen networks stay in eval mode in training mode; a bad kappa is
a :class:`ConfigError`; the declared members are sound (the tighter side and the perfect value
agree with ``reached``); the name resolves through the registry. Override
:meth:`ConstraintContract.batch` to feed realistic data.

``geco_core.testing`` is itself a plugin (load it with ``GECO_PLUGINS=geco_core.testing``) that
registers :class:`MeanAbsoluteError` as ``test-mae``: geco's own suite uses it where a test needs a
constraint but not a particular plugin.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from geco_core.constraint import (
    Batch,
    Constraint,
    ConstraintLike,
    check_kappa,
    check_same_shape,
    missing_members,
    perfect,
    tighter,
)
from geco_core.errors import ConfigError
from geco_core.hookspecs import hookimpl
from geco_core.plugins import create_constraint, registry

__all__ = ["ConstraintContract", "MeanAbsoluteError", "BAD_KAPPAS"]

#: kappas no constraint accepts
BAD_KAPPAS: tuple[Any, ...] = (math.nan, math.inf, -math.inf, -1e9, "0.1", True, None)


class MeanAbsoluteError(Constraint):
    """Test constraint: mean absolute pixel error minus kappa (kappa in pixel units)."""

    name = "test-mae"
    units = "pixel MAE"
    tighter, perfect = -1, 0.0

    def __init__(self, kappa: float, image_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.kappa = check_kappa(self.name, kappa, 0.0, what="a pixel MAE > 0")
        self.value_scale = self.kappa
        self.multiplier_scale = (math.prod(image_shape) if image_shape else 1) / (2 * self.kappa)

    def forward(self, batch: Batch) -> Tensor:
        check_same_shape(self.name, batch.x, batch.x_hat)
        return (batch.x - batch.x_hat).abs().flatten(1).mean(1, keepdim=True) - self.kappa

    def reached(self, values: Tensor) -> Tensor:
        """The mean absolute error that values stand for: ``value + kappa``."""
        return values + self.kappa


@hookimpl
def geco_register_constraints(register):
    register(MeanAbsoluteError)


class ConstraintContract:
    """Every promise of the constraint contract, as pytest tests. Subclass it with ``name`` (the
    registered name), ``options`` (a valid configuration, with ``kappa``) and ``image_shape``."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    batch_size: ClassVar[int] = 16
    distribution: ClassVar[str | None] = None  # if set: the distribution whose entry point must provide it

    def make(self, **changes: Any) -> ConstraintLike:
        """The constraint, built through the registry as the trainer builds it."""
        entry = registry().get("constraint", self.name)
        extra = {"image_shape": self.image_shape} if entry.accepts("image_shape") else {}
        return create_constraint(self.name, **extra, **{**self.options, **changes})

    def batch(self, seed: int = 0) -> Batch:
        """Random targets, reconstructions (with gradient), labels 0-9 per channel, and indices."""
        g = torch.Generator().manual_seed(seed)
        shape = (self.batch_size, *self.image_shape)
        x = torch.rand(shape, generator=g)
        x_hat = (x + 0.3 * torch.randn(shape, generator=g)).clamp(0, 1).requires_grad_()
        labels = torch.randint(0, 10, (self.batch_size, self.image_shape[0]), generator=g).squeeze(1)
        return Batch(x=x, x_hat=x_hat, labels=labels, index=torch.arange(self.batch_size))

    # --- the contract --------------------------------------------------------------------------

    def test_declares_every_member_of_the_contract(self):
        c = self.make()
        assert not missing_members(c), f"missing: {missing_members(c)}"
        assert c.name == self.name and isinstance(c.dim, int) and c.dim >= 1
        assert len(c.component_names) == c.dim == len(set(c.component_names))
        assert c.kappa == self.options["kappa"]
        assert isinstance(c.units, str) and c.units
        for scale in (c.multiplier_scale, c.value_scale):
            assert isinstance(scale, float | int) and 0 < scale < math.inf

    def test_values_have_shape_batch_by_dim(self):
        c = self.make()
        values = c(self.batch())
        assert values.shape == (self.batch_size, c.dim) and values.dtype.is_floating_point
        assert torch.isfinite(values).all()

    def test_satisfied_exactly_where_reached_is_on_kappas_side(self):
        c = self.make()
        boundary = c.reached(torch.zeros(c.dim))
        if boundary is None:
            _skip(f"{self.name} maps no values back to kappa's units (reached returns None)")
        torch.testing.assert_close(boundary, torch.full((c.dim,), float(c.kappa)), rtol=1e-5, atol=1e-6)
        # which side of kappa is the satisfied one: that of a slightly negative value
        side = torch.sign(c.reached(torch.full((c.dim,), -1e-3 * c.value_scale)) - c.kappa)
        assert (side != 0).all(), "reached must move away from kappa as the value moves from 0"
        with torch.no_grad():
            values = torch.cat([c(self.batch(seed)) for seed in range(3)])
        values = torch.cat([values, torch.linspace(-0.5, 0.5, 11)[:, None].expand(-1, c.dim) * c.value_scale])
        reached = c.reached(values)
        on_side = (torch.sign(reached - c.kappa) == side) | (reached == c.kappa)
        assert torch.equal(values <= 0, on_side)

    def test_its_tighter_side_and_perfect_value_agree_with_reached(self):
        c = self.make()
        derived = type("Derived", (), {k: getattr(c, k) for k in ("kappa", "dim", "value_scale")})()
        derived.reached = c.reached
        assert tighter(c) in (-1, 1) and math.isfinite(perfect(c))
        if c.reached(torch.zeros(c.dim)) is not None:  # what it declares is what reached implies
            assert tighter(c) == tighter(derived)
            assert math.isclose(perfect(c), perfect(derived), rel_tol=1e-5, abs_tol=1e-6)
        assert tighter(c) * (perfect(c) - float(c.kappa)) >= 0, "perfect must lie on kappa's tight side"

    def test_gradients_reach_x_hat_and_no_frozen_weight(self):
        c = self.make()
        batch = self.batch()
        c(batch).sum().backward()
        assert batch.x_hat.grad is not None and torch.isfinite(batch.x_hat.grad).all()
        assert batch.x_hat.grad.abs().sum() > 0
        if isinstance(c, nn.Module):
            for pname, p in c.named_parameters():
                assert not p.requires_grad and p.grad is None, f"{pname} would learn"

    def test_frozen_networks_stay_in_eval_mode(self):
        c = self.make()
        if not isinstance(c, nn.Module):
            _skip(f"{self.name} is not an nn.Module: it has no training mode")
        c.train()
        frozen = [m for m in c.modules() if getattr(m, "_geco_frozen", False)]
        assert all(not m.training for m in frozen)
        has_weights = any(True for _ in c.parameters())
        assert not has_weights or frozen, "a network inside a constraint must go through geco_core.freeze"

    def test_a_bad_kappa_is_a_config_error_naming_kappa(self):
        for kappa in BAD_KAPPAS:
            try:
                self.make(kappa=kappa)
            except ConfigError as exc:
                assert "kappa" in str(exc) and "\n" not in str(exc)
            else:
                raise AssertionError(f"kappa = {kappa!r} was accepted")

    def test_the_name_resolves_through_the_registry(self):
        entry = registry().get("constraint", self.name)
        assert self.make().name == entry.name == self.name
        assert entry.description, "give the constraint a docstring: its first paragraph is its description"
        if self.distribution is not None:
            assert entry.distribution == self.distribution


def _skip(reason: str) -> None:
    """Skip the current contract test (pytest is imported only when a test runs)."""
    import pytest

    pytest.skip(reason)
