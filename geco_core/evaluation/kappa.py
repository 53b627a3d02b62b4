"""``geco find-kappa``: which kappa a GECO run can reach, and what each one costs in KL.

One short run with the ``ramp`` controller and the normalised Lagrangian (the shape of a
learning-rate finder): every
constraint's lambda is held at ``high`` times its natural scale for the first half of the steps,
so that the model learns to reconstruct as well as it can, then falls exponentially to ``low``
times that scale, so that the model trades reconstruction for KL on the way down. Every ``every``
steps the run's validation examples (held out of the training set, the same ones each time, drawn
with the same seed) are measured: each constraint's value in kappa's units and the KL.

From those measurements, per constraint:

* **the reachable floor** at the user's budget (``train.steps``): the held part's learning curve
  ``v(t) = v_inf + a t^-b`` (least squares, ``b`` on a grid) extrapolated to the budget, or the
  best value measured anywhere in the run (held or on the way down) where that is tighter or the
  fit does not hold;
* **the curve** of the way down, kappa against the KL it took (the lower envelope: for each value,
  the least KL of any point at least as tight), which predicts what a GECO run at kappa pays
  (log-linear between points);
* **the suggested kappa**, the knee: the value from which tightening kappa by a further 1% costs
  more than :data:`KNEE` (3%) more KL (from the tight end of the curve, the first value whose
  looser neighbourhood costs less); 1% of the slack, the distance to a perfect value (RE: 1% of
  the RMSE; pNCC: 1% of one minus the correlation).

Stacked constraints share one ramp (each lambda the same factor of its own natural scale): one
run whatever the stack, every constraint's curve measured with the others weighted alike; in a
stacked GECO run the constraint whose predicted KL is the largest is the binding one. A
constraint of several components is measured as the mean of its components.

Writes into a run folder (``logging.dir/kappa-<config>-<time>``): the run's files, ``kappa.json``
(everything, with the config's fingerprint, which ``geco train`` compares to warn about a kappa
below the floor), ``kappa.md`` (the table) and ``kappa.png`` (curve and learning curve).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from geco_core.constraint import perfect, tighter
from geco_core.controllers import NormalisedLagrangian
from geco_core.errors import ConfigError
from geco_core.figures.kappa import plot_result
from geco_core.geco import build_controller
from geco_core.plugins import create, registry
from geco_core.training import Callback, Config, Run, TrainerState, load_config, strict_json, train, write_atomic
from geco_core.training.experiment import PassMeasures
from geco_core.training.rng import seeded

__all__ = [
    "find_kappa",
    "KappaFinder",
    "KappaResult",
    "Finding",
    "TableRow",
    "Prediction",
    "predict",
    "probe_point",
    "ramp_options",
    "predict_kl",
    "describe",
    "analyse",
    "fingerprint",
    "settings",
    "finder_result",
    "below_floor",
    "format_result",
    "KNEE",
    "FINDER_STEPS",
    "default_steps",
]

#: a further 1% of kappa past the suggested one costs more than this much KL (relative)
KNEE = 0.03
#: the finder's default length: one run of the multiplier benchmark's budget
FINDER_STEPS = 2000
#: the ramp (``Ramp``): lambda / natural scale while held, the share of the steps before the
#: descent, and lambda / natural scale at its end
HIGH, HOLD, LOW = 100.0, 0.5, 3e-3
#: the ramp's climb (from ``START`` times the natural scale at ``RATE`` per step in log lambda, the
#: ``restart`` controller's) takes at most this share of the finder's steps: faster on short finders
START, RATE, CLIMB = 1e-3, 0.05, 0.25
#: the shortest finder: fewer probes than this leave no curve to read
MIN_STEPS = 20
#: the floor is extrapolated at most this many times the held part's length
REACH = 5
#: validation examples measured at each probe, and probes per run
PROBE_EXAMPLES, PROBES = 400, 40


#: the train keys that are neither what a finder's result is for nor the optimiser's settings:
#: the budget (kept in the result), the seed, the machine and the run's bookkeeping
_BOOKKEEPING = ("steps", "seed", "threads", "device", "compile", "checkpoint_every", "log_every", "validate_every",
                "max_nonfinite_steps")  # fmt: skip


def fingerprint(config: Config) -> str:
    """What a finder's result is valid for: the data, the model and the constraint stack (each
    constraint's options but kappa), whatever the optimiser's settings (:func:`settings`)."""
    doc = config.to_dict()
    constraints = [{k: v for k, v in c.items() if k not in _kappa_keys(c["name"])} for c in doc["constraints"]]
    what = {"data": doc["data"], "model": doc["model"], "constraints": constraints}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _kappa_keys(name: str) -> set[str]:
    """The options that state a constraint's kappa: ``kappa``, and for a constraint with a second
    unit (its ``also``) ``kappa_<unit>`` (RE's ``kappa_psnr``)."""
    try:
        also = getattr(registry().get("constraint", name).factory, "also", None)
    except ConfigError:
        also = None
    return {"kappa"} | ({f"kappa_{also.name}"} if also is not None else set())


def settings(config: Config) -> dict[str, Any]:
    """The optimiser's settings a finder ran with (``train.lr``, ``train.batch_size``, the
    objective's ``alpha``, controller, ...), flat, keyed as ``--set`` keys them."""
    doc = config.to_dict()
    out = {f"train.{k}": v for k, v in doc["train"].items() if k not in _BOOKKEEPING}
    name = config.objective.name
    out["objective.name"] = name
    out.update({f"objective.{name}.{k}": v for k, v in doc["objective"].get(name, {}).items()})
    return json.loads(json.dumps(out, default=str))


def probe_point(geco, step: int, values: torch.Tensor, kl: torch.Tensor) -> dict[str, Any]:
    """One measurement of the finder: each constraint's mean over the validation examples'
    ``values`` ``(n, L)`` in kappa's units (a constraint of several components: the mean of its
    components), their mean ``kl`` ``(n,)`` (nats) and lambda / natural scale, at ``step``."""
    means = values.detach().float().mean(0)
    points = {}
    for (name, part), constraint in zip(geco.stack.split(means).items(), geco.stack.constraints):
        mean = part.mean().reshape(1)
        reached = constraint.reached(mean)
        points[name] = float(mean if reached is None else reached)
    factor = float((geco.lambdas / geco.multiplier_scale).mean())
    return {"step": int(step), "factor": factor, "kl": float(kl.detach().double().sum()) / len(kl), "values": points}


@attrs.define
class _Probe(Callback):
    """``geco find-kappa``'s probe: measures every constraint (in kappa's units) and the KL on fixed
    validation examples every ``every`` steps (:func:`probe_point`); keeps the points in
    ``points`` and in ``probe.jsonl``."""

    every: int
    points: list[dict[str, Any]] = attrs.field(factory=list)
    stack: Any = None  # the constraints measured

    def on_fit_start(self, trainer: TrainerState) -> None:
        path = trainer.run.path / "probe.jsonl"
        if path.exists():  # a resumed finder: the points up to its checkpoint
            self.points = [p for p in map(json.loads, path.read_text().splitlines()) if p["step"] <= trainer.start]
        write_atomic(path, lambda f: f.write("".join(strict_json(p) + "\n" for p in self.points).encode()))

    def on_step_end(self, trainer: TrainerState, metrics) -> None:
        if trainer.step % self.every and trainer.step != trainer.exp.config.train.steps:
            return
        exp = trainer.exp
        index = torch.arange(min(PROBE_EXAMPLES, len(exp.validation)))
        with seeded(exp.device, exp.config.train.seed):  # the same draws at every probe
            measures = PassMeasures(exp, report=False).measure(exp.validation, index)
        point = probe_point(exp.geco, trainer.step, measures.values, measures.kl)
        self.points.append(point)
        with open(trainer.run.path / "probe.jsonl", "a") as f:
            f.write(strict_json(point) + "\n")
        self.stack = exp.stack


def _tighter(meta: dict[str, Any]) -> int:
    """Which way a constraint the analysis describes is tighter (:func:`~geco_core.constraint.tighter`);
    a result written before 0.4.1 says it only in words (``direction``)."""
    if "tighter" in meta:
        return int(meta["tighter"])
    return -1 if meta["direction"].startswith("lower") else 1


def _power_law_floor(points: Sequence[tuple[float, float]], budget: float) -> tuple[float | None, dict]:
    """``v(budget)`` of ``v(t) = v_inf + a t^-b`` fitted to ``points`` (t, v) by least squares over
    ``b`` in [0.05, 3]; None where fewer than 4 points or no fit improves on a constant."""
    if len(points) < 4:
        return None, {}
    t = torch.tensor([p[0] for p in points], dtype=torch.float64)
    v = torch.tensor([p[1] for p in points], dtype=torch.float64)
    best = None
    for b in torch.linspace(0.05, 3.0, 60).tolist():
        design = torch.stack([torch.ones_like(t), t.pow(-b)], dim=1)
        coef = torch.linalg.lstsq(design, v.unsqueeze(1)).solution.squeeze(1)
        residual = float((design @ coef - v).square().sum())
        if best is None or residual < best[0]:
            best = (residual, b, float(coef[0]), float(coef[1]))
    residual, b, v_inf, a = best
    if residual >= float((v - v.mean()).square().sum()):
        return None, {}
    return v_inf + a * budget ** (-b), {"v_inf": v_inf, "a": a, "b": b}


def _envelope(points: Sequence[tuple[float, ...]], direction: int) -> list[tuple[float, ...]]:
    """The lower envelope of points ``(value, KL, ...)``: for each value, the least KL of any point
    at least as tight; sorted from loose to tight, KL rising."""
    out: list[tuple[float, ...]] = []
    for point in sorted(points, key=lambda p: direction * p[0], reverse=True):  # tightest first
        if not out or point[1] < out[-1][1]:
            out.append(tuple(point))
    return out[::-1]


@attrs.frozen
class Prediction:
    """What a GECO run at a kappa is predicted to pay: ``kl`` (nats; None out of reach), the
    interval ``low``-``high`` that held every GECO run of the benchmark, where the prediction
    comes from (:data:`INTERVALS`), and ``way_down``, the KL the finder's way down paid there."""

    kl: float | None
    where: str
    low: float | None = None
    high: float | None = None
    way_down: float | None = None


#: a GECO run at kappa pays about SLOPE * (the KL the finder's way down paid there) - OFFSET nats,
#: never less than MIN_SHARE of it: the way down is one path, a GECO run finds one a few nats cheaper
#: (fitted on benchmarks/kappa_finder.py --intervals, docs/BENCHMARKS.md)
SLOPE, OFFSET, MIN_SHARE = 0.952, 4.38, 0.3
#: between the curve and the floor a GECO run pays about HELD times the KL at the held high lambda
HELD = 0.5
#: where a prediction comes from -> the interval (low, high) as factors of the prediction, as wide
#: as the benchmark's GECO runs left out of fitting SLOPE and OFFSET needed. "interpolated": between
#: two points of the way down; "looser than measured": looser than its loosest point (the KL a run
#: pays falls towards 0); "held": between the way down's tightest point and the floor
INTERVALS: dict[str, tuple[float, float]] = {
    "interpolated": (0.8, 1.3),
    "looser than measured": (0.0, 1.3),
    "held": (0.7, 1.45),
}


@attrs.frozen
class TableRow:
    """One row of the finder's table: ``kappa``, the KL a GECO run there is predicted to pay and its
    interval (nats; None out of reach), and where the prediction comes from (``kappa.json``: ``from``)."""

    kappa: float
    predicted_kl: float | None
    low: float | None
    high: float | None
    where: str

    def to_json(self) -> dict[str, Any]:
        return {"kappa": self.kappa, "predicted_kl": self.predicted_kl, "low": self.low, "high": self.high,
                "from": self.where}  # fmt: skip


@attrs.frozen(kw_only=True)
class Finding:
    """What the finder found for one constraint (:func:`analyse`).

    units, kappa:    the constraint's units and its configured kappa
    tighter:         -1 where smaller values are tighter, +1 where larger are; ``perfect``: the
                     value of a perfect reconstruction (:func:`~geco_core.constraint.tighter`)
    floor:           the tightest kappa reachable at the budget (None: cannot tell at this length);
                     ``floor_status``: extrapolated, measured or cannot tell; ``floor_measured``: the
                     best value measured anywhere; ``fit``: the held part's learning curve
                     (``v_inf + a t^-b``; empty where none)
    kl_at_high:      mean KL (nats) at the held high lambda, the last probes before the way down
    curve:           the way down's envelope, ``(value, KL)`` from loose to tight
    suggested_kappa: the knee; ``frugal_kappa``: where the predicted KL is half the knee's
    table:           kappa against predicted KL (:class:`TableRow`)
    """

    units: str
    kappa: float
    tighter: int
    perfect: float
    floor: float | None
    floor_status: str
    floor_measured: float | None
    fit: Mapping[str, float]
    kl_at_high: float | None
    suggested_kappa: float | None
    curve: tuple[tuple[float, float], ...]
    frugal_kappa: float | None = None
    table: tuple[TableRow, ...] = ()

    @property
    def direction(self) -> str:
        return "lower is tighter" if self.tighter < 0 else "higher is tighter"

    def predict(self, kappa: float) -> Prediction:
        """The KL a GECO run at ``kappa`` is predicted to pay: the way down's KL (log-linear between
        the points of the curve around ``kappa``; the loosest point's where ``kappa`` is looser than
        every point) corrected by :data:`SLOPE` and :data:`OFFSET`; :data:`HELD` times the KL at the
        held high lambda between the curve's tightest point and the floor (where a GECO run whose
        kappa the way down never reached ends); out of reach tighter than the floor. With its
        interval (:data:`INTERVALS`)."""
        direction = self.tighter
        envelope = list(self.curve)
        way, where = None, "out of reach"
        if envelope:
            loose, tight = envelope[0], envelope[-1]
            if direction * (kappa - tight[0]) > 0:
                floor = self.floor if self.floor is not None else self.floor_measured
                if floor is not None and direction * (kappa - floor) <= 0 and self.kl_at_high is not None:
                    way, where = self.kl_at_high, "held"
            elif direction * (kappa - loose[0]) <= 0:
                way, where = loose[1], "looser than measured"
            else:
                for (v0, k0), (v1, k1) in zip(envelope, envelope[1:]):
                    if direction * (kappa - v0) >= 0 and direction * (kappa - v1) <= 0:
                        t = 0.0 if v1 == v0 else (kappa - v0) / (v1 - v0)
                        way = math.exp((1 - t) * math.log(max(k0, 1e-6)) + t * math.log(max(k1, 1e-6)))
                        where = "interpolated"
                        break
        if way is None:
            return Prediction(None, "out of reach")
        kl = HELD * way if where == "held" else max(SLOPE * way - OFFSET, MIN_SHARE * way)
        low, high = INTERVALS[where]
        return Prediction(kl, where, kl * low, kl * high, way)

    def to_json(self) -> dict[str, Any]:
        """As ``kappa.json`` holds it."""
        return {
            "units": self.units, "kappa": self.kappa, "tighter": self.tighter, "direction": self.direction,
            "perfect": self.perfect, "floor": self.floor, "floor_status": self.floor_status,
            "floor_measured": self.floor_measured, "fit": dict(self.fit), "kl_at_high": self.kl_at_high,
            "suggested_kappa": self.suggested_kappa, "curve": [{"value": v, "kl": k} for v, k in self.curve],
            "frugal_kappa": self.frugal_kappa, "table": [row.to_json() for row in self.table],
        }  # fmt: skip

    @classmethod
    def from_json(cls, c: Mapping[str, Any]) -> Finding:
        """A finding as :meth:`to_json` wrote it (files of 0.4.0 say which way is tighter in words)."""
        table = tuple(TableRow(r["kappa"], r["predicted_kl"], r["low"], r["high"], r["from"]) for r in c["table"])
        return cls(
            units=c["units"], kappa=c["kappa"], tighter=_tighter(c), perfect=c.get("perfect", 0.0),
            floor=c["floor"], floor_status=c["floor_status"], floor_measured=c["floor_measured"],
            fit=c.get("fit") or {}, kl_at_high=c["kl_at_high"], suggested_kappa=c["suggested_kappa"],
            curve=tuple((q["value"], q["kl"]) for q in c["curve"]), frugal_kappa=c["frugal_kappa"], table=table,
        )  # fmt: skip


def predict(finding: Finding, kappa: float) -> Prediction:
    """:meth:`Finding.predict`."""
    return finding.predict(kappa)


def predict_kl(finding: Finding, kappa: float) -> float | None:
    """The KL of :meth:`Finding.predict`, nats (None: out of reach)."""
    return finding.predict(kappa).kl


def _frugal(finding: Finding) -> float | None:
    """The kappa, looser than the knee, at which a GECO run is predicted to pay half the knee's KL
    (bisection along the curve, where the prediction falls as kappa loosens); None where the curve
    ends first."""
    knee, curve = finding.suggested_kappa, finding.curve
    if knee is None or not curve:
        return None
    target = 0.5 * finding.predict(knee).kl
    tight, loose = knee, curve[0][0]
    if finding.predict(loose).kl > target:
        return None
    for _ in range(60):
        middle = (tight + loose) / 2
        tight, loose = (middle, loose) if finding.predict(middle).kl > target else (tight, middle)
    return loose


def _knee(envelope: Sequence[tuple[float, float]], perfect: float) -> float | None:
    """The knee of the envelope: from its tight end towards the loose one, the first value from
    which a further 1% tighter costs more than :data:`KNEE` more KL, that is the tight end of the
    first stretch that costs less. "1% tighter" is 1% less slack, the distance to the ``perfect``
    value (RE: an RMSE of 0; pNCC: a correlation of 1); the envelope's points are taken at least
    2% of the slack apart."""
    slack = [(abs(v - perfect), v, kl) for v, kl in envelope]
    kept = [slack[-1]]
    for point in reversed(slack[:-1]):  # tight to loose
        if point[0] >= 1.02 * kept[-1][0]:
            kept.append(point)
    for (s_tight, v_tight, k_tight), (s_loose, _, k_loose) in zip(kept, kept[1:]):
        if s_tight <= 0:
            continue
        tighter = math.log(s_loose / s_tight) / math.log(1.01)  # in steps of 1% of the slack
        costlier = math.log(max(k_tight, 1e-6) / max(k_loose, 1e-6)) / math.log(1 + KNEE)  # in steps of KNEE
        if costlier <= tighter:
            return v_tight
    return kept[-1][1]


def describe(stack) -> dict[str, dict[str, Any]]:
    """What the analysis needs of each constraint of ``stack``: its units, kappa, which way is
    tighter, and its perfect value (where ``value_scale``, a constraint's declared distance from
    its bound to perfection, takes it: RE's RMSE 0, pNCC's correlation 1)."""
    out = {}
    for name, c in stack.by_name.items():
        direction = tighter(c)
        out[name] = {
            "units": c.units,
            "kappa": float(c.kappa),
            "tighter": direction,
            "direction": "lower is tighter" if direction < 0 else "higher is tighter",
            "perfect": perfect(c),
        }
    return out


def analyse(
    points: Sequence[dict[str, Any]], constraints: dict[str, dict], budget: int, hold_steps: int
) -> dict[str, Finding]:
    """Per constraint (:func:`describe`): the floor at ``budget``, the curve, the table and the
    suggestion (module docstring) from the probe ``points``."""
    out: dict[str, Finding] = {}
    last = max((p["step"] for p in points), default=0)
    for name, meta in constraints.items():
        direction = _tighter(meta)
        held = [(p["step"], p["values"][name]) for p in points if p["step"] <= hold_steps]
        ramp = [(p["values"][name], p["kl"]) for p in points if p["step"] > hold_steps]
        measured = min((p["values"][name] for p in points), key=lambda v: direction * -v, default=None)
        floor, status, fit = _floor(held, measured, budget, last, hold_steps, direction, meta.get("perfect", 0.0))
        envelope = _envelope(ramp, direction) if ramp else []
        suggestion = _knee(envelope, meta.get("perfect", 0.0)) if envelope else None
        kappas = _grid(measured if floor is None else floor, envelope, direction)
        high = [p["kl"] for p in points if p["step"] <= hold_steps][-3:]
        finding = Finding(
            units=meta["units"],
            kappa=meta["kappa"],
            tighter=direction,
            perfect=meta.get("perfect", 0.0),
            floor=floor,
            floor_status=status,
            floor_measured=measured,
            fit=fit,
            kl_at_high=sum(high) / len(high) if high else None,
            suggested_kappa=suggestion,
            curve=tuple((v, k) for v, k in envelope),
        )
        finding = attrs.evolve(finding, frugal_kappa=_frugal(finding))
        out[name] = attrs.evolve(finding, table=tuple(_row(k, finding.predict(k)) for k in kappas))
    return out


def _row(kappa: float, p: Prediction) -> TableRow:
    return TableRow(kappa, p.kl, p.low, p.high, p.where)


def _floor(held, measured, budget: int, steps: int, hold_steps: int, direction: int, perfect: float):
    """The reachable floor at ``budget`` from the held part's points ``(step, value)`` and the best
    value ``measured`` anywhere in a finder of ``steps``: ``(floor, status, fit)``. The learning
    curve, fitted over the held part's second half (well after the climb), is extrapolated at most
    :data:`REACH` times the held part's length and never past ``perfect`` ("extrapolated"); a
    value measured at least as tight, or with no extrapolation a budget no longer than the finder,
    gives the measured floor ("measured"); otherwise None ("cannot tell")."""
    fitted, fit = None, {}
    if budget <= REACH * hold_steps:
        fitted, fit = _power_law_floor([p for p in held if p[0] >= 0.5 * hold_steps], budget)
    if fitted is not None and direction * (fitted - perfect) > 0:
        fitted = perfect
    if fitted is not None and direction * (fitted - measured) > 0:
        return fitted, "extrapolated", fit
    if fitted is not None or budget <= steps:
        return measured, "measured", fit
    return None, "cannot tell", fit


def _grid(floor: float | None, envelope: Sequence[tuple[float, float]], direction: int) -> list[float]:
    """Ten kappa values from the floor (to 4 digits) to the loosest measured value (3 digits), none
    rounded past the floor."""
    if floor is None or not envelope:
        return []
    loose = envelope[0][0]
    values = {float(f"{v:.3g}") for v in (floor + (loose - floor) * (i / 9) ** 1.5 for i in range(1, 10))}
    first = float(f"{floor:.4g}")
    if direction * (first - floor) > 0 and floor != 0:  # rounded past the floor: one unit of the 4th digit looser
        first = float(f"{floor - direction * 10 ** (math.floor(math.log10(abs(floor))) - 3):.4g}")
    return sorted(
        {first, *(v for v in values if direction * (v - first) < 0)}, key=lambda v: direction * v, reverse=True
    )


def ramp_options(steps: int) -> dict[str, float]:
    """The finder's ramp (:class:`~geco_core.controllers.Ramp`) for ``steps`` steps: it climbs at
    :data:`RATE` per step in log lambda, or faster where the climb from :data:`START` to
    :data:`HIGH` would take more than :data:`CLIMB` of the steps."""
    if steps < MIN_STEPS:
        raise ConfigError(f"the kappa finder needs at least {MIN_STEPS} steps, got {steps}")
    rate = max(RATE, math.log(HIGH / START) / (CLIMB * steps))
    return {"steps": steps, "start": START, "rate": rate, "high": HIGH, "hold": HOLD, "low": LOW}


def default_steps(budget: int) -> int:
    """The finder's default length for runs of ``budget`` steps: :data:`FINDER_STEPS`, longer where
    its floor would have to reach further than :data:`REACH` times its held part, never longer
    than the budget."""
    return min(budget, max(FINDER_STEPS, telling_steps(budget)))


def telling_steps(budget: int) -> int:
    """The shortest finder whose floor reaches ``budget`` (its held part times :data:`REACH`)."""
    return math.ceil(budget / (REACH * HOLD))


def find_kappa(
    config_path: str | Path | None = None,
    *,
    config: Config | None = None,
    overrides: Sequence[str] = (),
    steps: int | None = None,
    run_dir: str | Path | None = None,
) -> KappaResult:
    """Run the finder for a config (file or :class:`Config`) and return its result (also
    ``kappa.json`` in its folder): per constraint the floor, the table kappa -> predicted KL, the
    curve and the suggested kappa. ``steps``: the finder's length (default :func:`default_steps`)."""
    if config is None:
        if config_path is None:
            raise ConfigError("find-kappa needs a config file or a Config")
        config = load_config(config_path, overrides)
    if not config.constraints or "controller" not in config.objective.options:
        raise ConfigError("find-kappa needs a GECO objective with at least one [[constraints]] table")
    budget = config.train.steps
    n = steps if steps is not None else default_steps(budget)
    ramp = {"name": "ramp", **ramp_options(n)}
    finder = attrs.evolve(
        config,
        objective=attrs.evolve(
            config.objective, options={**config.objective.options, "controller": ramp, "formulation": "normalised"}
        ),
        train=attrs.evolve(
            config.train,
            steps=n,
            validation=config.train.validation or 1000,
            validate_every=n + 1,
            checkpoint_every=max(n // 4, 1),
        ),
        logging=attrs.evolve(config.logging, tensorboard=False, plots=False, eval_examples=0),
    )
    probe = _Probe(every=max(n // PROBES, 1))
    name = f"kappa-{Path(config_path).stem}" if config_path else "kappa"
    if run_dir is None:
        run_dir = Run.create(finder, None, name=name).path
    folder = Path(train(config=finder, run_dir=run_dir, extra_callbacks=[probe]))
    return _result(probe.points, probe.stack, budget, int(HOLD * n), config, folder)


def _result(points, stack, budget: int, hold: int, config: Config | None, folder) -> KappaResult:
    result = KappaResult(
        folder=None if folder is None else str(folder),
        config_fingerprint=None if config is None else fingerprint(config),
        settings=None if config is None else settings(config),
        budget=budget,
        finder_steps=points[-1]["step"] if points else 0,
        hold_steps=hold,
        knee=KNEE,
        constraints=analyse(points, describe(stack), budget, hold),
        points=tuple(points),
    )
    if folder is not None:
        result.save(folder)
    return result


@attrs.frozen(kw_only=True)
class KappaResult:
    """A finder's result (``kappa.json``), shaped as Lightning's LR finder's: per constraint a
    :class:`Finding` (floor, curve, table, suggestion), the probes it came from, and what a user asks
    of it (:meth:`suggestion`, :meth:`predict_kl`, :meth:`table`, :meth:`plot`, :meth:`save`).

    budget:             the GECO run length the predictions are for; ``finder_steps``: the finder's;
                        ``hold_steps``: its held part; ``knee``: :data:`KNEE`
    config_fingerprint, settings: what the result counts for (:func:`fingerprint`) and the optimiser
                        settings it ran with (None outside ``geco find-kappa``); ``folder``: its run
    points:             the probes: ``step``, ``values`` by constraint (kappa's units), ``kl``
                        (nats) and ``factor`` (lambda / natural scale)
    """

    folder: str | None
    config_fingerprint: str | None
    settings: Mapping[str, Any] | None
    budget: int
    finder_steps: int
    hold_steps: int
    knee: float
    constraints: Mapping[str, Finding]
    points: tuple[Mapping[str, Any], ...]

    def constraint(self, name: str | None = None) -> Finding:
        """One constraint's finding: ``name``, or the first constraint's."""
        if name is None:
            return next(iter(self.constraints.values()))
        if name not in self.constraints:
            raise KeyError(f"no constraint {name!r} in this finder's result (it has {', '.join(self.constraints)})")
        return self.constraints[name]

    def predict_kl(self, kappa: float, constraint: str | None = None) -> float | None:
        """The KL (nats) a GECO run at ``kappa`` is predicted to pay (:meth:`Finding.predict`)."""
        return self.constraint(constraint).predict(kappa).kl

    def suggestion(self, constraint: str | None = None) -> float | None:
        """The suggested kappa, the knee (module docstring)."""
        return self.constraint(constraint).suggested_kappa

    def table(self) -> str:
        """What ``geco find-kappa`` prints (:func:`format_result`)."""
        return format_result(self)

    def plot(self, path: str | Path) -> Path:
        """The finder's figure (:func:`~geco_core.figures.kappa.plot_result`) as ``path``."""
        return plot_result(self, Path(path))

    def save(self, folder: str | Path) -> Path:
        """``kappa.json``, ``kappa.md`` and ``kappa.png`` in ``folder``; returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "kappa.json", lambda f: f.write(strict_json(self.to_json(), indent=1).encode()))
        write_atomic(folder / "kappa.md", lambda f: f.write(self.table().encode()))
        self.plot(folder / "kappa.png")
        return folder

    def to_json(self) -> dict[str, Any]:
        """As ``kappa.json`` holds it."""
        fields = {a.name: getattr(self, a.name) for a in attrs.fields(KappaResult)}
        fields["settings"] = None if self.settings is None else dict(self.settings)
        fields["constraints"] = {name: c.to_json() for name, c in self.constraints.items()}
        fields["points"] = [dict(p) for p in self.points]
        return fields

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> KappaResult:
        """A result as :meth:`to_json` wrote it (``kappa.json``)."""
        names = {a.name for a in attrs.fields(KappaResult)} - {"constraints", "points", "settings"}
        fields = {k: doc[k] for k in names}
        constraints = {name: Finding.from_json(c) for name, c in doc["constraints"].items()}
        return cls(**fields, settings=doc.get("settings"), constraints=constraints, points=tuple(doc["points"]))


class KappaFinder:
    """The finder in your own loop: the ramp as GECO's controller while the finder is entered, and a
    probe you feed the validation examples' constraint values and KL::

        finder = KappaFinder(geco, steps=2000, budget=5000)
        with finder:  # geco follows the ramp; its state and controller come back on exit
            for step in range(1, finder.steps + 1):
                ...  # one training step: loss = geco(kl, batch); loss.backward(); optimizer.step()
                if finder.due(step):
                    finder.probe(step, values, kl)  # geco.evaluate on validation batches, in eval mode
        result = finder.result()  # floor, table, suggestion, plot: as geco find-kappa gives them

    ``steps``: the finder's length (the ramp's schedule counts GECO's updates); ``budget``: the
    length of the GECO run the predictions are for (default ``steps``); ``config``: a
    :class:`~geco_core.training.Config` whose fingerprint and settings the result carries, for
    ``geco train``'s warning. The model's weights are yours: start the GECO run from fresh ones."""

    def __init__(self, geco, steps: int = FINDER_STEPS, budget: int | None = None, config: Config | None = None):
        self.geco, self.steps, self.budget = geco, int(steps), int(budget or steps)
        self.ramp = build_controller({"name": "ramp", **ramp_options(self.steps)})
        self.every = max(self.steps // PROBES, 1)
        self.points: list[dict[str, Any]] = []
        self.config = config
        self._saved: tuple | None = None

    def __enter__(self) -> KappaFinder:
        geco = self.geco
        self._saved = (geco.controller, geco.formulation, geco.may_restart, copy.deepcopy(geco.state_dict()))
        geco.formulation = NormalisedLagrangian()  # the ramp moves lambda by five decades
        with torch.no_grad():
            geco.controller = self.ramp.to(geco.log_lambdas.device)
            start = self.ramp.initial_log_lambdas(geco.log_lambdas, geco.multiplier_scale)
            geco.log_lambdas.copy_(start.clamp(geco.log_lambda_min, geco.log_lambda_max))
            for buffer in (geco.step, geco.c_ma, geco.gap, geco.validated):
                buffer.zero_()
        self.ramp.setup(geco.log_lambdas)
        geco.may_restart = False
        return self

    def __exit__(self, *exc) -> None:
        controller, formulation, may_restart, state = self._saved
        self.geco.controller, self.geco.formulation, self.geco.may_restart = controller, formulation, may_restart
        self.geco.load_state_dict(state)

    def due(self, step: int) -> bool:
        """Whether to probe after training step ``step`` (1-based)."""
        return step % self.every == 0 or step == self.steps

    def probe(self, step: int, values: torch.Tensor, kl: torch.Tensor) -> dict[str, Any]:
        """Record the validation examples' constraint values ``(n, L)`` and KL ``(n,)`` (nats) after
        training step ``step``; the same examples (and posterior draws, where you can) each time."""
        point = probe_point(self.geco, step, values, kl)
        self.points.append(point)
        return point

    def result(self, folder: str | Path | None = None) -> KappaResult:
        """The analysis of the points so far (:func:`analyse`); also saved in ``folder`` if given."""
        return _result(self.points, self.geco.stack, self.budget, int(HOLD * self.steps), self.config, folder)


def format_result(result: KappaResult) -> str:
    """What ``geco find-kappa`` prints: per constraint, the floor, the suggestion, the table."""
    lines = [f"kappa finder: {result.finder_steps} steps; the floor is for runs of {result.budget} steps"]
    for name, c in result.constraints.items():
        lines += [
            "",
            f"{name} ({c.units}; {c.direction}; configured kappa {c.kappa:g})",
            f"  reachable floor at {result.budget} steps: {_floor_text(result, c)}",
            f"  suggested kappa {_num(c.suggested_kappa)}, the knee: the tightest worth paying for (a further 1% "
            f"of the slack costs more than {result.knee:.0%} more KL); predicted KL "
            f"{_kl_text(c, c.suggested_kappa)}",
            f"  frugal kappa {_num(c.frugal_kappa)}: half the knee's KL; predicted KL {_kl_text(c, c.frugal_kappa)}",
            "",
            "  predicted KL: what a GECO run at kappa pays, from the finder's way down (a model trained "
            f"{result.finder_steps} steps) as the benchmark corrected it, and the interval that held the "
            "benchmark's runs (docs/kappa.md)",
            "  | kappa | predicted KL (nats) | interval (nats) | from |",
            "  |---|---|---|---|",
        ]
        lines += [
            f"  | {row.kappa:g} | {_num(row.predicted_kl, '.1f')} | "
            f"{_num(row.low, '.1f')}–{_num(row.high, '.1f')} | {row.where} |"
            for row in c.table
        ]
    return "\n".join(lines) + "\n"


def _kl_text(c: Finding, kappa: float | None) -> str:
    if kappa is None:
        return "-"
    p = c.predict(kappa)
    return "-" if p.kl is None else f"{p.kl:.3g} nats ({p.low:.3g}–{p.high:.3g}, {p.where})"


def _floor_text(result: KappaResult, c: Finding) -> str:
    status = c.floor_status
    if status == "cannot tell":
        return (
            f"cannot tell at this length (the finder extrapolates at most {REACH}x its {result.hold_steps} held "
            f"steps: run it with --steps {telling_steps(result.budget)} or more); best measured "
            f"{_num(c.floor_measured)}"
        )
    return f"{_num(c.floor)} ({status}; best measured {_num(c.floor_measured)})"


def _num(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def finder_result(config: Config) -> KappaResult | None:
    """The newest finder result under ``logging.dir`` made for this config (same fingerprint)."""
    want = fingerprint(config)
    found = []
    for path in Path(config.logging.dir).glob("*/kappa.json"):
        try:
            doc = json.loads(path.read_text())
            if doc.get("config_fingerprint") != want:
                continue
            found.append((path.stat().st_mtime, KappaResult.from_json(doc)))
        except (OSError, ValueError, KeyError, TypeError):  # not a finder's result of this version
            continue
    return max(found, key=lambda f: f[0])[1] if found else None


def _kappa_of(spec) -> float | None:
    """A configured constraint's kappa in its own units, also where the config gives it in its second
    unit (``kappa_<unit>``): the constraint built from the options says; None where it cannot be."""
    if "kappa" in spec.options:
        return spec.options["kappa"]
    try:
        return getattr(create("constraint", spec.name, **spec.options), "kappa", None)
    except (ConfigError, TypeError, ValueError):
        return None


def below_floor(config: Config) -> list[str]:
    """One line per constraint whose kappa is tighter than a finder's reachable floor for this
    config (same data, model and constraint stack); each says where the finder ran with other
    optimiser settings."""
    result = finder_result(config)
    if result is None or config.train.steps > result.budget:  # a longer run may reach further
        return []
    theirs, ours = result.settings or {}, settings(config)
    differ = [
        f"{k} {theirs.get(k)!r} (here {ours.get(k)!r})"
        for k in sorted({*theirs, *ours})
        if theirs.get(k) != ours.get(k)
    ]
    note = f"; the finder ran with other settings: {', '.join(differ)}" if differ else ""
    lines = []
    for spec, (name, c) in zip(config.constraints, result.constraints.items()):
        kappa, floor = _kappa_of(spec), c.floor
        if kappa is not None and floor is not None and c.tighter * (kappa - floor) > 0:
            lines.append(
                f"{name}: kappa {kappa:g} is tighter than the reachable floor {floor:.4g} at {result.budget} "
                f"steps found by geco find-kappa (suggested {_num(c.suggested_kappa)}){note}"
            )
    return lines
