"""``geco find-kappa``: which kappa a GECO run can reach, and what each one costs in KL.

One short run with the ``ramp`` controller (the shape of a learning-rate finder): every
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

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from geco_core.errors import ConfigError
from geco_core.figures.run import pyplot, save_figure
from geco_core.plugins import create
from geco_core.training import Callback, Config, Run, TrainerState, load_config, strict_json, train, write_atomic
from geco_core.training.experiment import constraint_values
from geco_core.training.rng import seeded

__all__ = [
    "find_kappa",
    "predict_kl",
    "describe",
    "analyse",
    "fingerprint",
    "finder_result",
    "below_floor",
    "format_result",
    "KNEE",
    "FINDER_STEPS",
]

#: a further 1% of kappa past the suggested one costs more than this much KL (relative)
KNEE = 0.03
#: the finder's default length: one run of the multiplier benchmark's budget
FINDER_STEPS = 2000
#: the ramp (``Ramp``): lambda / natural scale while held, the share of the steps before the
#: descent, and lambda / natural scale at its end
HIGH, HOLD, LOW = 100.0, 0.5, 3e-3
#: validation examples measured at each probe, and probes per run
PROBE_EXAMPLES, PROBES = 400, 40


def fingerprint(config: Config) -> str:
    """What a finder's result is valid for: the config apart from the constraints' kappa, the
    budget (``train.steps``, kept in the result), the logging section, the seed and the settings
    of the machine and the run's bookkeeping (threads, device, compile, checkpoints, records)."""
    doc = config.to_dict()
    doc.pop("logging", None)
    ignored = ("steps", "seed", "threads", "device", "compile", "checkpoint_every", "log_every", "validate_every",
               "max_nonfinite_steps")  # fmt: skip
    for key in ignored:
        doc["train"].pop(key, None)
    for c in doc.get("constraints", []):
        c.pop("kappa", None)
        c.pop("kappa_psnr", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@attrs.define
class _Probe(Callback):
    """Measures every constraint (in kappa's units) and the KL on fixed validation examples every
    ``every`` steps; keeps the points in ``points`` and in ``probe.jsonl``."""

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
        kl = torch.zeros((), dtype=torch.float64, device=exp.device)

        def add_kl(batch, out) -> None:
            kl.add_(out.kl.double().sum())

        with seeded(exp.device, exp.config.train.seed):  # the same draws at every probe
            means = constraint_values(exp, exp.validation, index, on_batch=add_kl).mean(0)
        values = {}
        for (name, part), constraint in zip(exp.stack.split(means).items(), exp.stack.constraints):
            mean = part.mean().reshape(1)  # a constraint of several components: their mean
            reached = constraint.reached(mean)
            values[name] = float(mean if reached is None else reached)
        factor = float((exp.geco.lambdas / exp.geco.multiplier_scale).mean())
        point = {"step": trainer.step, "factor": factor, "kl": float(kl) / len(index), "values": values}
        self.points.append(point)
        with open(trainer.run.path / "probe.jsonl", "a") as f:
            f.write(strict_json(point) + "\n")
        self.stack = exp.stack


def _direction(constraint) -> int:
    """-1 where smaller values of ``reached`` are tighter (an upper bound, RE), +1 where larger are
    (a lower bound: CLA, pNCC)."""
    probe = constraint.reached(torch.tensor([-1e-3 * float(constraint.value_scale)] * constraint.dim))
    if probe is None:
        return -1
    return -1 if float(probe.mean()) < float(constraint.kappa) else 1


def _tighter(meta: dict[str, Any]) -> int:
    """:func:`_direction` of a constraint as an analysis records it (its ``direction`` text)."""
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


def _envelope(points: Sequence[tuple[float, float]], direction: int) -> list[tuple[float, float]]:
    """The lower envelope of (value, KL): for each value, the least KL of any point at least as
    tight; sorted from loose to tight, KL rising."""
    out: list[tuple[float, float]] = []
    for value, kl in sorted(points, key=lambda p: direction * p[0], reverse=True):  # tightest first
        if not out or kl < out[-1][1]:
            out.append((value, kl))
    return out[::-1]


def predict_kl(result: dict[str, Any], kappa: float) -> float | None:
    """The KL a GECO run at ``kappa`` is predicted to pay, from one constraint's finder result:
    log-linear between the points of the curve around it; the loosest point's KL where ``kappa`` is
    looser than every point; the KL at the held high lambda (where a GECO run whose kappa the way
    down never reached ends) between the curve's tightest point and the floor; None (out of reach)
    tighter than the floor."""
    direction = _tighter(result)
    envelope = [(q["value"], q["kl"]) for q in result["curve"]]
    if not envelope:
        return None
    loose, tight = envelope[0], envelope[-1]
    if direction * (kappa - tight[0]) > 0:
        floor = result.get("floor")
        return result.get("kl_at_high") if floor is not None and direction * (kappa - floor) <= 0 else None
    if direction * (kappa - loose[0]) <= 0:
        return loose[1]
    for (v0, k0), (v1, k1) in zip(envelope, envelope[1:]):
        if direction * (kappa - v0) >= 0 and direction * (kappa - v1) <= 0:
            t = 0.0 if v1 == v0 else (kappa - v0) / (v1 - v0)
            return math.exp((1 - t) * math.log(max(k0, 1e-6)) + t * math.log(max(k1, 1e-6)))
    return None


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
        perfect = c.reached(torch.full((c.dim,), -float(c.value_scale)))
        out[name] = {
            "units": c.units,
            "kappa": float(c.kappa),
            "direction": "lower is tighter" if _direction(c) < 0 else "higher is tighter",
            "perfect": float(perfect.mean()) if perfect is not None else 0.0,
        }
    return out


def analyse(points: Sequence[dict[str, Any]], constraints: dict[str, dict], budget: int, hold_steps: int) -> dict:
    """Per constraint (:func:`describe`): the floor at ``budget``, the curve, the table and the
    suggestion (module docstring) from the probe ``points``."""
    out: dict[str, Any] = {}
    for name, meta in constraints.items():
        direction = _tighter(meta)
        held = [(p["step"], p["values"][name]) for p in points if p["step"] <= hold_steps]
        ramp = [(p["values"][name], p["kl"]) for p in points if p["step"] > hold_steps]
        measured = min((p["values"][name] for p in points), key=lambda v: direction * -v, default=None)
        fitted, fit = _power_law_floor([p for p in held if p[0] >= 0.5 * hold_steps], budget)  # well after the climb
        floor = fitted if fitted is not None and direction * (fitted - measured) >= 0 else measured
        envelope = _envelope(ramp, direction) if ramp else []
        suggestion = _knee(envelope, meta.get("perfect", 0.0)) if envelope else None
        kappas = _grid(floor, envelope, direction)
        high = [p["kl"] for p in points if p["step"] <= hold_steps][-3:]
        out[name] = result = {
            "units": meta["units"],
            "kappa": meta["kappa"],
            "direction": meta["direction"],
            "perfect": meta.get("perfect", 0.0),
            "floor": floor,
            "floor_measured": measured,
            "fit": fit,
            "kl_at_high": sum(high) / len(high) if high else None,
            "suggested_kappa": suggestion,
            "curve": [{"value": v, "kl": k} for v, k in envelope],
        }
        result["table"] = [{"kappa": k, "predicted_kl": predict_kl(result, k)} for k in kappas]
    return out


def _grid(floor: float | None, envelope: Sequence[tuple[float, float]], direction: int) -> list[float]:
    """Ten kappa values from the floor to the loosest measured value, rounded to 3 digits."""
    if floor is None or not envelope:
        return []
    loose = envelope[0][0]
    values = [floor + (loose - floor) * (i / 9) ** 1.5 for i in range(10)]
    return sorted({float(f"{v:.3g}") for v in values}, key=lambda v: direction * v, reverse=True)


def find_kappa(
    config_path: str | Path | None = None,
    *,
    config: Config | None = None,
    overrides: Sequence[str] = (),
    steps: int | None = None,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the finder for a config (file or :class:`Config`) and return its result (also
    ``kappa.json`` in its folder): per constraint the floor, the table kappa -> predicted KL, the
    curve and the suggested kappa. ``steps``: the finder's length (default the budget
    ``train.steps``, at most :data:`FINDER_STEPS`)."""
    if config is None:
        if config_path is None:
            raise ConfigError("find-kappa needs a config file or a Config")
        config = load_config(config_path, overrides)
    if not config.constraints or "controller" not in config.objective.options:
        raise ConfigError("find-kappa needs a GECO objective with at least one [[constraints]] table")
    budget = config.train.steps
    n = steps if steps is not None else min(budget, FINDER_STEPS)
    if n < 20:
        raise ConfigError(f"--steps must be at least 20, got {n}")
    ramp = {"name": "ramp", "steps": n, "high": HIGH, "hold": HOLD, "low": LOW}
    finder = attrs.evolve(
        config,
        objective=attrs.evolve(config.objective, options={**config.objective.options, "controller": ramp}),
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
    return _write(folder, config, probe, budget, int(HOLD * n))


def _write(folder: Path, config: Config, probe: _Probe, budget: int, hold: int) -> dict[str, Any]:
    points = probe.points
    result = {
        "folder": str(folder),
        "config_fingerprint": fingerprint(config),
        "budget": budget,
        "finder_steps": points[-1]["step"] if points else 0,
        "hold_steps": hold,
        "knee": KNEE,
        "constraints": analyse(points, describe(probe.stack), budget, hold),
        "points": points,
    }
    write_atomic(folder / "kappa.json", lambda f: f.write(strict_json(result, indent=1).encode()))
    write_atomic(folder / "kappa.md", lambda f: f.write(format_result(result).encode()))
    plot_result(result, folder / "kappa.png")
    return result


def format_result(result: dict[str, Any]) -> str:
    """What ``geco find-kappa`` prints: per constraint, the floor, the suggestion, the table."""
    lines = [f"kappa finder: {result['finder_steps']} steps, predictions for runs of {result['budget']} steps"]
    for name, c in result["constraints"].items():
        lines += [
            "",
            f"{name} ({c['units']}; {c['direction']}; configured kappa {c['kappa']:g})",
            f"  reachable floor at {result['budget']} steps: {_num(c['floor'])} (measured {_num(c['floor_measured'])})",
            f"  suggested kappa (knee: 1% tighter costs more than {result['knee']:.0%} more KL): "
            f"{_num(c['suggested_kappa'])}",
            "",
            "  | kappa | predicted KL (nats) |",
            "  |---|---|",
        ]
        lines += [f"  | {row['kappa']:g} | {_num(row['predicted_kl'], '.1f')} |" for row in c["table"]]
    return "\n".join(lines) + "\n"


def _num(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def plot_result(result: dict[str, Any], path: Path) -> Path:
    """Per constraint: the way down (value against KL, coloured by lambda / natural scale, the
    floor and the suggestion marked) and the held part's learning curve with its fit."""
    plt = pyplot()
    from matplotlib.colors import LogNorm

    names = list(result["constraints"])
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.8 * len(names)), squeeze=False, layout="constrained")
    points = result["points"]
    hold = result["hold_steps"]
    for row, name in zip(axes, names):
        c = result["constraints"][name]
        ramp = [p for p in points if p["step"] > hold]
        ax = row[0]
        drawn = ax.scatter(
            [p["values"][name] for p in ramp],
            [p["kl"] for p in ramp],
            c=[p["factor"] for p in ramp],
            cmap="viridis",
            norm=LogNorm(),
            s=14,
        )
        ax.plot([q["value"] for q in c["curve"]], [q["kl"] for q in c["curve"]], color="grey", lw=1)
        if c["floor"] is not None:
            ax.axvline(c["floor"], color="crimson", ls="--", lw=1, label=f"floor {c['floor']:.4g}")
        if c["suggested_kappa"] is not None:
            ax.axvline(
                c["suggested_kappa"], color="black", ls=":", lw=1, label=f"suggested κ {c['suggested_kappa']:.4g}"
            )
        ax.set(xlabel=f"κ: {c['units']}", ylabel="KL (nats, validation)", yscale="log", title=f"{name}: κ against KL")
        ax.legend(fontsize=8)
        fig.colorbar(drawn, ax=ax, label="λ / natural scale")
        ax = row[1]
        held = [p for p in points if p["step"] <= hold]
        ax.plot([p["step"] for p in held], [p["values"][name] for p in held], "o", ms=3, label="measured (λ held high)")
        if c["fit"]:
            f = c["fit"]
            ts = torch.linspace(max(1, 0.5 * hold), result["budget"], 100).tolist()
            ax.plot(ts, [f["v_inf"] + f["a"] * t ** (-f["b"]) for t in ts], color="crimson", lw=1, label="fit")
        ax.axvline(result["budget"], color="grey", ls=":", lw=1, label="budget")
        ax.set(xlabel="step", ylabel=c["units"], title=f"{name}: learning curve, extrapolated")
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=100)


def finder_result(config: Config) -> dict[str, Any] | None:
    """The newest finder result under ``logging.dir`` made for this config (same fingerprint)."""
    want = fingerprint(config)
    found = []
    for path in Path(config.logging.dir).glob("*/kappa.json"):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if result.get("config_fingerprint") == want:
            found.append((path.stat().st_mtime, result))
    return max(found, key=lambda f: f[0])[1] if found else None


def _kappa_of(spec) -> float | None:
    """A configured constraint's kappa in its own units, also where the config gives it in another
    (RE's ``kappa_psnr``): the constraint built from the options says; None where it cannot be."""
    if "kappa" in spec.options:
        return spec.options["kappa"]
    try:
        return getattr(create("constraint", spec.name, **spec.options), "kappa", None)
    except (ConfigError, TypeError, ValueError):
        return None


def below_floor(config: Config) -> list[str]:
    """One line per constraint whose kappa is tighter than a finder's reachable floor for this config."""
    result = finder_result(config)
    if result is None or config.train.steps > result["budget"]:  # a longer run may reach further
        return []
    lines = []
    for spec, (name, c) in zip(config.constraints, result["constraints"].items()):
        kappa, floor = _kappa_of(spec), c.get("floor")
        if kappa is not None and floor is not None and _tighter(c) * (kappa - floor) > 0:
            lines.append(
                f"{name}: kappa {kappa:g} is tighter than the reachable floor {floor:.4g} at {result['budget']} "
                f"steps found by geco find-kappa (suggested {_num(c['suggested_kappa'])})"
            )
    return lines
