"""What GECO knows of each constraint component after a step: one typed, frozen record.

:meth:`GECO.state` returns a :class:`GecoState`: the step, the skipped updates and one
:class:`ComponentState` per component (name, kappa, ``c_hat``, ``c_ma``, lambda, beta = 1/lambda,
the value reached in kappa's units, the status, the best value and its step while unreachable, and
what the controller adds). The trainer's metrics, the progress bar, plots, the summary,
``geco eval`` and the Lightning callback read these records; :meth:`GecoState.flat` writes the flat
metric keys (``<component>/<field>``, :func:`key`) in one place.

A component's status:

* ``met`` when its moving average, corrected by the generalisation gap measured on validation data,
  ``c_ma + gap <= 0`` (below, "the moving average" is that sum);
* ``at bound`` when it is above 0 but its reached value is within :data:`AT_BOUND` (2%, relative)
  of kappa, on either side: where GECO holds an active constraint that KL minimisation pushes
  against (its moving average then hovers around 0);
* ``unreachable`` when the controller stopped lambda from growing because the constraint stalled
  above kappa (``best`` and ``best_step`` say what it reached and when);
* ``diverged`` when the last batch's value was not finite (GECO skipped that update);
* ``violated`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from geco_core.constraint import Units

__all__ = ["ComponentState", "GecoState", "snapshot", "component_status", "key", "overview", "AT_BOUND", "MANY"]

AT_BOUND = 0.02
#: a constraint with more components than this is logged and summarised as one overview
MANY = 8


def key(component: str, field: str) -> str:
    """The flat metric key of a component's field: ``re/lambda``."""
    return f"{component}/{field}"


def component_status(
    target: float, reached: float | None, kappa: float, unreachable: bool = False, finite: bool = True
) -> str:
    """A component's status from its target (the moving average plus the generalisation gap, what
    the controller drives to <= 0), the value it reached and its kappa (module docstring);
    ``finite``: whether the last batch's value was."""
    if not finite:
        return "diverged"
    if target <= 0:
        return "met"
    if reached is not None and kappa and abs(reached - kappa) <= AT_BOUND * abs(kappa):
        return "at bound"
    return "unreachable" if unreachable else "violated"


@attrs.frozen
class ComponentState:
    """One constraint component after a step.

    name:        the component (``re``, ``re[3]`` for one of several)
    constraint:  the constraint it belongs to (its unique name in the stack)
    kappa:       the constraint's bound, in ``units``
    c_hat:       the last batch's mean value (value units; ``<= 0`` where satisfied)
    c_ma:        its moving average, what lambda follows
    lambda_:     the multiplier; ``beta = 1 / lambda_``
    reached:     ``c_ma`` in kappa's units (RE: the pixel RMSE); None where the constraint has none
    gap:         the generalisation gap measured on validation data (value units; 0 before any):
                 GECO drives ``c_ma + gap`` to ``<= 0``
    status:      met, at bound, violated, unreachable or diverged, of ``c_ma + gap``
    unreachable: whether the controller holds lambda on a plateau; None for one that never does
    best:        the best ``c_ma`` since the component was last satisfied, in kappa's units (in
                 value units where the constraint has no ``reached``); None while it is satisfied
    best_step:   the update at which ``best`` was reached; None when there is none
    extra:       whatever else the controller reports (``restarted``)
    also:        the constraint's second unit of kappa, if any (RE: PSNR in dB)
    """

    name: str
    constraint: str
    kappa: float
    units: str
    c_hat: float
    c_ma: float
    lambda_: float
    beta: float
    reached: float | None
    gap: float
    status: str
    unreachable: bool | None = None
    best: float | None = None
    best_step: int | None = None
    extra: Mapping[str, float] = attrs.field(factory=dict)
    also: Units | None = None

    def flat(self) -> dict[str, float]:
        """The flat metrics of this component, ``<name>/<field>``; a field that is None is left out."""
        fields: dict[str, Any] = {"c_hat": self.c_hat, "c_ma": self.c_ma, "lambda": self.lambda_, "beta": self.beta}
        fields["gap"] = self.gap
        if self.unreachable is not None:
            fields.update(unreachable=float(self.unreachable), best=self.best, best_step=self.best_step)
        fields.update(self.extra)
        fields["reached"] = self.reached
        return {key(self.name, k): float(v) for k, v in fields.items() if v is not None}


def overview(components: Sequence[ComponentState]) -> dict[str, float]:
    """Many components of one constraint in three numbers: the share satisfied (``c_ma + gap <= 0``),
    the worst moving average, the median multiplier (the lower middle one for an even count)."""
    c_ma = torch.tensor([c.c_ma for c in components], dtype=torch.float64)
    gap = torch.tensor([c.gap for c in components], dtype=torch.float64)
    lambdas = torch.tensor([c.lambda_ for c in components], dtype=torch.float64)
    return {
        "satisfied_fraction": float((c_ma + gap <= 0).double().mean()),
        "c_ma_max": float(c_ma.max()),
        "lambda_median": float(lambdas.median()),
    }


@attrs.frozen
class GecoState:
    """GECO after a step: ``step`` (updates applied), ``skipped`` (updates refused for a non-finite
    ``c_hat``) and one :class:`ComponentState` per component, in stack order."""

    step: int
    skipped: int
    components: tuple[ComponentState, ...]

    def __str__(self) -> str:
        """A line per component: ``re: reached 0.1052 vs kappa 0.1 (violated), c_ma +0.00107, lambda 3.92e+03``."""
        lines = [f"GECO after {self.step} updates ({self.skipped} skipped)"]
        for c in self.components:
            reached = f"reached {c.reached:.4g} vs kappa {c.kappa:g}" if c.reached is not None else f"kappa {c.kappa:g}"
            lines.append(f"  {c.name}: {reached} ({c.status}), c_ma {c.c_ma:+.3g}, lambda {c.lambda_:.3g}")
        return "\n".join(lines)

    def by_constraint(self) -> dict[str, tuple[ComponentState, ...]]:
        """The components grouped by the constraint they belong to, in stack order."""
        groups: dict[str, list[ComponentState]] = {}
        for c in self.components:
            groups.setdefault(c.constraint, []).append(c)
        return {name: tuple(group) for name, group in groups.items()}

    def flat(self) -> dict[str, float]:
        """Flat metric keys: every component's fields (:meth:`ComponentState.flat`), or for a
        constraint of more than :data:`MANY` components its :func:`overview`
        (``<constraint>/satisfied_fraction``, ...); then ``geco/step`` and ``geco/skipped``."""
        out: dict[str, float] = {}
        for name, group in self.by_constraint().items():
            if len(group) > MANY:
                out.update({key(name, k): v for k, v in overview(group).items()})
            else:
                for component in group:
                    out.update(component.flat())
        out["geco/step"] = float(self.step)
        out["geco/skipped"] = float(self.skipped)
        return out


def snapshot(geco: Any, progress: Any, may_restart: torch.Tensor | None) -> tuple[GecoState, bool]:
    """:meth:`GECO.state`'s record of ``geco`` after a step, given its controller's ``progress``
    (:class:`~geco_core.controllers.Progress`) and ``may_restart``; and whether the controller may
    still restart (the host's copy). Every per-component column is read in one host sync."""
    target = geco.target
    lambdas = geco.lambdas
    columns = {
        "c_hat": geco.c_hat,
        "c_ma": geco.c_ma,
        "lambda_": lambdas,
        "beta": lambdas.reciprocal(),
        "reached": geco.stack.reached(geco.c_ma),
        "gap": geco.gap,
        "target": target,
        "target_reached": geco.stack.reached(target),
    }
    if progress.unreachable is not None:
        best = geco.stack.reached(progress.best)
        columns.update(
            unreachable=progress.unreachable,
            best=torch.where(best.isnan(), progress.best, best),  # value units where nothing is reached
            best_step=progress.best_step,
        )
    columns.update(progress.extra)
    scalars = [geco.step, geco.skipped, may_restart if may_restart is not None else geco.step.new_tensor(1)]
    table = torch.cat(
        [
            torch.stack([c.to(torch.float64) for c in columns.values()]).flatten(),
            *(s.reshape(1).to(torch.float64) for s in scalars),
        ]
    ).tolist()  # the one host read
    step, skipped, restarts = (int(v) for v in table[-3:])
    size = geco.num_components
    rows = {name: table[i * size : (i + 1) * size] for i, name in enumerate(columns)}
    return _assemble(geco.stack, rows, list(progress.extra), step, skipped), bool(restarts)


def _assemble(
    stack: Any, rows: Mapping[str, Sequence[float]], extra: Sequence[str], step: int, skipped: int
) -> GecoState:
    """The record from the host copy of the per-component columns ``rows`` (``c_hat``, ``c_ma``,
    ``lambda_``, ``beta``, ``reached``, ``gap``, ``target``, ``target_reached``; where the
    controller has them ``unreachable``, ``best``, ``best_step``, and its ``extra`` fields), NaN
    where a constraint has no value in kappa's units."""
    constraints = stack.per_component(stack.constraints)
    components = []
    for j, name in enumerate(stack.component_names):
        row = {k: v[j] for k, v in rows.items()}
        reached = None if math.isnan(row["reached"]) else row["reached"]
        target_reached = None if math.isnan(row["target_reached"]) else row["target_reached"]
        unreachable = None if "unreachable" not in row else bool(row["unreachable"])
        best = row.get("best", math.nan)
        components.append(
            ComponentState(
                name=name,
                constraint=stack.component_constraints[j],
                kappa=float(constraints[j].kappa),
                units=constraints[j].units,
                also=getattr(constraints[j], "also", None),
                c_hat=row["c_hat"],
                c_ma=row["c_ma"],
                lambda_=row["lambda_"],
                beta=row["beta"],
                reached=reached,
                gap=row["gap"],
                status=component_status(
                    row["target"],
                    target_reached,
                    float(constraints[j].kappa),
                    bool(unreachable),
                    math.isfinite(row["c_hat"]),
                ),
                unreachable=unreachable,
                best=None if math.isnan(best) else best,
                best_step=None if math.isnan(best) else int(row["best_step"]),
                extra={k: row[k] for k in extra},
            )
        )
    return GecoState(step=step, skipped=skipped, components=tuple(components))
