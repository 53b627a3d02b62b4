"""One row of a summary or ``geco eval`` report: a constraint component against its kappa.

:class:`ConstraintRow` is the typed record that the summary, ``geco eval``, sweeps and the CLI read
(:func:`~geco_core.training.summary.constraint_rows` builds it); :meth:`ConstraintRow.to_json`
and :meth:`ConstraintRow.from_json` are its form in ``summary.json`` and ``eval.json``, where the
second unit's values are written beside the first (``kappa_psnr``) and the twin's verdict is
repeated under the keys of geco 0.3.0 (``heldout_twin_value``, ``twin_status``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["ConstraintRow", "Judged", "SecondUnit"]

#: the fields written in the second unit too (``<field>_<unit name>``)
CONVERTED = ("kappa", "reached", "heldout_reached", "best")


@attrs.frozen
class Judged:
    """A component under an independent judge: its held-out mean value (value units), that value in
    kappa's units (None where the constraint has none), ``met`` or ``violated``."""

    name: str
    value: float
    reached: float | None
    status: str

    @property
    def shown(self) -> float:
        """The value a reader compares with kappa: in kappa's units where there are some."""
        return self.value if self.reached is None else self.reached

    def to_json(self) -> dict[str, Any]:
        reached = {} if self.reached is None else {"reached": self.reached}
        return {"name": self.name, "value": self.value, **reached, "status": self.status}


@attrs.frozen
class SecondUnit:
    """A row's values in its constraint's second unit (RE: PSNR in dB): ``name``, ``symbol`` and
    the converted values by field (:data:`CONVERTED`)."""

    name: str
    symbol: str
    values: Mapping[str, float] = attrs.field(factory=dict)

    def format(self, field: str) -> str:
        """`` (20.0 dB)``: the field in this unit; empty where the row has no such value."""
        value = self.values.get(field)
        return "" if value is None else f" ({value:.1f} {self.symbol})"


@attrs.frozen(kw_only=True)
class ConstraintRow:
    """A constraint component at the end of a run.

    constraint, component, kappa, units: what it is (kappa in ``units``)
    status:          met, at bound, unreachable, violated (GECO's view, or for other objectives
                     the held-out mean's); None for an overview row without GECO
    c_ma, lambda_, beta, reached: GECO's state (``reached``: ``c_ma`` in kappa's units)
    best, best_step: the best value and its step, where ``unreachable``
    heldout_value, heldout_reached: the held-out mean in value units and in kappa's units
    judges:          the held-out verdicts of independent judges (:class:`Judged`)
    data_reached:    what the held-out data themselves reach (each example its own reconstruction),
                     in kappa's units, where that is not the perfect value (a learned constraint:
                     CLA's p of the true digit for real digits); ``beyond_data``: whether kappa is
                     tighter than that, asking the reconstructions to beat the data
    also:            the values in the constraint's second unit, if it has one
    components, satisfied_fraction, c_ma_max, lambda_median, heldout_satisfied_fraction:
                     an overview row (one for a constraint of many components)
    """

    constraint: str
    component: str
    kappa: float
    units: str
    status: str | None = None
    c_ma: float | None = None
    lambda_: float | None = None
    beta: float | None = None
    reached: float | None = None
    best: float | None = None
    best_step: int | None = None
    heldout_value: float | None = None
    heldout_reached: float | None = None
    judges: tuple[Judged, ...] = ()
    data_reached: float | None = None
    beyond_data: bool | None = None
    also: SecondUnit | None = None
    components: int | None = None
    satisfied_fraction: float | None = None
    c_ma_max: float | None = None
    lambda_median: float | None = None
    heldout_satisfied_fraction: float | None = None

    @property
    def heldout(self) -> float | None:
        """The held-out mean a reader compares with kappa: in kappa's units where there are some."""
        return self.heldout_value if self.heldout_reached is None else self.heldout_reached

    @property
    def judges_met(self) -> int:
        """Under how many independent judges the component is met."""
        return sum(j.status == "met" for j in self.judges)

    @property
    def enforced(self) -> bool:
        """Whether GECO enforced this one component (the row carries its moving average)."""
        return self.c_ma is not None

    def second(self, field: str) -> str:
        """`` (20.0 dB)``: ``field`` in the second unit, or empty."""
        return "" if self.also is None else self.also.format(field)

    def data_line(self) -> str | None:
        """``cla: the held-out data themselves reach 0.930 (kappa 0.9)``, where they do not reach the
        perfect value; None elsewhere."""
        if self.data_reached is None:
            return None
        beyond = ": kappa asks the reconstructions to beat the data" if self.beyond_data else ""
        reach = f"the held-out data themselves reach {self.data_reached:.3f}"
        return f"{self.component}: {reach} (kappa {self.kappa:g}){beyond}"

    def judges_line(self) -> str | None:
        """``cla: met under its own network, met under 2 of 3 independent judges (twin 0.91 met, ...)``."""
        if not self.judges:
            return None
        own = "met" if (self.heldout_value if self.heldout_value is not None else math.inf) <= 0 else "not met"
        parts = ", ".join(f"{j.name} {j.shown:.3f} {j.status}" for j in self.judges)
        return (
            f"{self.component}: {own} under its own network, met under {self.judges_met} of {len(self.judges)} "
            f"independent judges ({parts})"
        )

    def to_json(self) -> dict[str, Any]:
        """The row as ``summary.json`` writes it: fields that are None left out, ``lambda`` for
        ``lambda_``, the second unit's values as ``<field>_<unit>``."""
        out: dict[str, Any] = {"constraint": self.constraint, "kappa": self.kappa, "units": self.units}
        out["component"] = self.component
        if self.components is not None:
            for key in ("components", "satisfied_fraction", "c_ma_max", "lambda_median", "heldout_satisfied_fraction"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
            return out
        fields = {"c_ma": self.c_ma, "lambda": self.lambda_, "beta": self.beta, "reached": self.reached}
        fields.update(status=self.status, best=self.best, best_step=self.best_step)
        fields.update(heldout_value=self.heldout_value, heldout_reached=self.heldout_reached)
        if self.lambda_ is None:  # the held-out mean decides: the status follows it
            fields["status"] = fields.pop("status")
        out.update({k: v for k, v in fields.items() if v is not None})
        if self.data_reached is not None:
            out["data_reached"], out["beyond_data"] = self.data_reached, self.beyond_data
        if self.judges:
            out["judges"] = [j.to_json() for j in self.judges]
            out["judges_met"] = self.judges_met
            twin = next((j for j in self.judges if j.name == "twin"), None)
            if twin is not None:
                out["heldout_twin_value"], out["twin_status"] = twin.value, twin.status
                if twin.reached is not None:
                    out["heldout_twin_reached"] = twin.reached
        if self.also is not None:
            out["also"] = {"name": self.also.name, "symbol": self.also.symbol}
            out.update({f"{k}_{self.also.name}": v for k, v in self.also.values.items()})
        return out

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> ConstraintRow:
        """A row as :meth:`to_json` wrote it (``summary.json``, ``eval.json``)."""
        names = set(attrs.fields_dict(cls)) - {"lambda_", "judges", "also"}
        fields: dict[str, Any] = {k: v for k, v in row.items() if k in names}
        fields["lambda_"] = row.get("lambda")
        fields["judges"] = tuple(
            Judged(j["name"], j["value"], j.get("reached"), j["status"]) for j in row.get("judges", ())
        )
        also = row.get("also")
        if also is not None:
            values = {k: row[f"{k}_{also['name']}"] for k in CONVERTED if f"{k}_{also['name']}" in row}
            fields["also"] = SecondUnit(also["name"], also["symbol"], values)
        return cls(**fields)
