"""The multiplier benchmark: which controller keeps GECO's promise (held-out constraint at kappa with
the smallest KL) across the shipped configs, at a fixed budget. It decides the default controller.

    GECO_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multipliers.py \\
        --out runs/multipliers --jobs 2 [--cells color-mnist] [--controllers paper restart] [--seeds 0 1]

Cells: configs x kappa (``CELLS``), each trained ``--steps`` steps (2000) with every controller
(``CONTROLLERS``); and per config, ``FRONTIER`` fixed multipliers (lambda = factor * the
constraint's natural scale at the config's kappa, never moving) that trace the fixed-lambda
frontier: held-out value (in the units of kappa) against KL. Per cell and controller:

* ``dev``: held-out (value - kappa) / kappa, signed so that < 0 is the satisfied side;
* ``KL/front``: the held-out KL over the frontier's KL at the same held-out value (log-linear
  interpolation between the two fixed-lambda runs around it; blank outside their range, where
  the controller reached a value no fixed lambda did);
* ``max λ``, ``final λ`` (first component), ``sat@``: the first logged step with c_ma <= 0;
* ``g/√v``: |g| / sqrt(v_hat) of Adam, RMS over parameters, mean of the last 50 steps (1 for a
  steady state; near 0 for a frozen model);
* whether the cell meets the targets: |dev| <= 5% on the satisfied side, KL/front <= 1, lambda never
  at its ceiling, g/√v >= 0.1 (cells where kappa is out of reach at this budget are marked).

Runs go to ``OUT/<cell>/<controller>-s<seed>`` and are kept: a second invocation reuses finished runs
and resumes interrupted ones (``bench.json`` in each run caches its row), so the matrix can be built
up over several invocations. Writes ``OUT/multipliers.md`` and ``OUT/multipliers.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: cell name -> (config file, kappa of the first constraint or None for the config's own)
CELLS: dict[str, tuple[str, float | None]] = {
    "mnist-k0.06": ("mnist-geco-re.toml", 0.06),
    "mnist-k0.07": ("mnist-geco-re.toml", 0.07),
    "mnist-k0.085": ("mnist-geco-re.toml", 0.085),
    "mnist-k0.1": ("mnist-geco-re.toml", 0.1),
    "mnist-k0.175": ("mnist-geco-re.toml", 0.175),
    "color-mnist-k0.08": ("color-mnist-geco-re.toml", 0.08),
    "color-mnist-k0.1": ("color-mnist-geco-re.toml", 0.1),
    "color-mnist-k0.11": ("color-mnist-geco-re.toml", 0.11),
    "color-mnist-k0.125": ("color-mnist-geco-re.toml", 0.125),
    "color-mnist-k0.15": ("color-mnist-geco-re.toml", 0.15),
    "color-mnist-k0.175": ("color-mnist-geco-re.toml", 0.175),
    "color-nvp-k0.1": ("color-mnist-nvp-geco.toml", 0.1),
    "color-nvp-k0.125": ("color-mnist-nvp-geco.toml", 0.125),
    "re-cla": ("mnist-geco-re-cla.toml", None),
    "fre-k0.15": ("mnist-geco-fre.toml", 0.15),
    "fre-k0.25": ("mnist-geco-fre.toml", 0.25),
    "fre-k0.3": ("mnist-geco-fre.toml", 0.3),
    "fre": ("mnist-geco-fre.toml", None),
    "pncc-k0.97": ("mnist-geco-pncc.toml", 0.97),
    "pncc-k0.93": ("mnist-geco-pncc.toml", 0.93),
    "pncc-k0.9": ("mnist-geco-pncc.toml", 0.9),
    "pncc": ("mnist-geco-pncc.toml", None),
    "cla": ("mnist-geco-cla.toml", None),
    "cla-alone": ("mnist-geco-cla.toml", None),  # its first constraint only: CLA without the pixel guard
    "ssim": ("mnist-geco-ssim.toml", None),
    "quickstart": ("quickstart.toml", None),
}

#: controller label -> controller spec (``paper`` runs each config exactly as shipped before this benchmark)
CONTROLLERS: dict[str, Any] = {
    "paper": "paper",
    "scaled": "scaled",
    "restart": "restart",
    "nupi": "nupi",
    "normalised": "scaled",  # with the normalised formulation (cell_config)
    "restart-to-start": {"name": "restart", "restart_to": "start"},
    "restart-no-margin": {"name": "restart", "margin": 0.0},
    "restart-max1e4": {"name": "restart", "max_factor": 1e4},
}

#: fixed lambda = factor * natural multiplier scale of each component (at the config's own kappa): one
#: frontier per config, shared by its kappa cells (held-out RMSE against KL does not depend on kappa)
FRONTIER = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)

#: what the configs held before this benchmark, for the ``paper`` rows ("GECO as shipped")
SHIPPED_PAPER = {
    "lr": {"mnist-geco-pncc.toml": 0.3, "mnist-geco-cla.toml": 0.3},
    "lambda_max": {"mnist-geco-fre.toml": 1e5},
}


def frontier_cell(path: str) -> str:
    """The cell of a config's fixed-lambda runs."""
    return f"frontier-{Path(path).stem}"


def cell_config(cell: str, label: str, seed: int, steps: int) -> dict[str, Any]:
    """The TOML document of one run: the cell's config, the budget, the controller (or a fixed lambda)."""
    path, kappa = CELLS[cell] if cell in CELLS else (cell.removeprefix("frontier-") + ".toml", None)
    doc = tomllib.loads((REPO / "configs" / path).read_text())
    doc = copy.deepcopy(doc)
    objective = doc.setdefault("objective", {})
    geco = objective.setdefault("geco", {})
    for key in ("lr", "lambda_min", "lambda_max", "lambda_init", "controller"):
        geco.pop(key, None)
    for c in doc["constraints"]:
        c.pop("lr", None)
        c.pop("lambda_init", None)
    geco["alpha"] = 0.9
    if label.startswith("fixed-"):  # lambda_init is a factor of the natural scale; it never moves
        geco["lambda_init"] = float(label.removeprefix("fixed-"))
        geco["controller"] = {"name": "scaled", "start": 1.0, "step": 1e-12, "patience": 0}
    elif label == "paper":
        geco["controller"] = "paper"
        geco["lr"] = SHIPPED_PAPER["lr"].get(path, 1.0)
        if path in SHIPPED_PAPER["lambda_max"]:
            geco["lambda_max"] = SHIPPED_PAPER["lambda_max"][path]
        if path == "mnist-geco-re-cla.toml":
            doc["constraints"][1]["lr"] = 0.1
        for c in doc["constraints"]:
            if c["name"] == "cla":
                c["form"] = "probability"  # the paper's CLA, as shipped before
    else:
        geco["controller"] = CONTROLLERS[label]
        if label == "normalised":
            geco["formulation"] = "normalised"
    if cell.endswith("-alone"):
        doc["constraints"] = doc["constraints"][:1]
    if kappa is not None:
        doc["constraints"][0]["kappa"] = kappa
    doc.setdefault("train", {}).update(steps=steps, seed=seed, log_every=10, checkpoint_every=500)
    doc["logging"] = {"progress": False, "tensorboard": False, "plots": False, "eval_examples": 2000}
    return doc


def run_cell(out: str, cell: str, label: str, seed: int, steps: int) -> dict[str, Any]:
    """Train (or reuse) one run and measure it; the row is cached in the run folder."""
    import torch

    torch.set_num_threads(1)
    from geco_core.training import Callback, Config, Run, resume, train

    folder = Path(out) / cell / f"{label}-s{seed}"
    cached = folder / "bench.json"
    if cached.is_file():
        return json.loads(cached.read_text())

    class AdamRatio(Callback):
        """|g| / sqrt(v_hat) (RMS over parameters) averaged over the last 50 steps."""

        def __init__(self) -> None:
            self.values: list[float] = []

        def on_step_end(self, trainer, metrics) -> None:
            if trainer.step <= trainer.exp.config.train.steps - 50:
                return
            opt = trainer.exp.optimizer
            g2 = v2 = 0.0
            for group in opt.param_groups:
                beta2 = group["betas"][1]
                for p in group["params"]:
                    state = opt.state.get(p)
                    if p.grad is None or not state or "exp_avg_sq" not in state:
                        continue
                    bias = 1 - beta2 ** float(state["step"])
                    g2 += float(p.grad.square().sum())
                    v2 += float(state["exp_avg_sq"].sum()) / bias
            if v2 > 0:
                self.values.append(math.sqrt(g2 / v2))

    ratio = AdamRatio()
    config = Config.from_dict(cell_config(cell, label, seed, steps))
    if (folder / "summary.json").is_file():
        ratio.values = [float("nan")]
    elif (folder / "config.toml").is_file():
        resume(folder, extra_callbacks=[ratio])
    else:
        train(config=config, run_dir=folder, extra_callbacks=[ratio])
    run = Run.open(folder)
    summary, records = run.read_summary(), run.read_metrics()
    first = summary["constraints"][0]
    component = first.component
    lambdas = [r.get(f"{component}/lambda") for r in records if r.get(f"{component}/lambda") is not None]
    satisfied = next((r["step"] for r in records if (r.get(f"{component}/c_ma") or 1) <= 0), None)
    row = {
        "cell": cell,
        "controller": label,
        "seed": seed,
        "kappa": first.kappa,
        "heldout": first.heldout,
        "heldout_value": first.heldout_value,
        "twin_heldout": next((j.reached for j in first.judges if j.name == "twin"), None),  # a learned constraint
        "statuses": [c.status for c in summary["constraints"]],
        "kl": summary["heldout"]["kl"],
        "rmse": summary["heldout"]["rmse"],
        "max_lambda": max(lambdas) if lambdas else None,
        "final_lambda": lambdas[-1] if lambdas else None,
        "first_satisfied": satisfied,
        "adam_ratio": sum(ratio.values) / len(ratio.values) if ratio.values else None,
        "diverged": summary["status"] == "diverged",
        "seconds": summary["seconds"],
    }
    cached.write_text(json.dumps(row, indent=1))
    return row


def deviation(row: dict[str, Any]) -> float | None:
    """(held-out - kappa) / kappa, signed so that < 0 is the satisfied side (value <= 0)."""
    if row["heldout"] is None or row["heldout_value"] is None:
        return None
    dev = abs(row["heldout"] - row["kappa"]) / row["kappa"]
    return -dev if row["heldout_value"] <= 0 else dev


def frontier_kl(rows: list[dict[str, Any]], reached: float) -> float | None:
    """The fixed-lambda frontier's KL at the held-out value ``reached`` (in the units of kappa;
    log-linear between the two fixed runs around it; None outside their range)."""
    points = sorted((r["heldout"], r["kl"]) for r in rows if r["heldout"] is not None and r["kl"] > 0)
    for (v0, k0), (v1, k1) in zip(points, points[1:]):
        if v0 <= reached <= v1:
            t = 0.0 if v1 == v0 else (reached - v0) / (v1 - v0)
            return math.exp((1 - t) * math.log(k0) + t * math.log(k1))
    return None


def reachable(cell_rows: list[dict[str, Any]], frontier: list[dict[str, Any]]) -> bool:
    """Whether any run of the cell (any controller or seed) or any fixed lambda of its config ended
    held-out on the satisfied side of the cell's kappa: if none did, kappa is out of reach at this
    budget and the cell is not held against the targets. Without frontier runs for its config a
    cell counts as reachable (judged, not excused)."""
    if not frontier or any(r["heldout_value"] is not None and r["heldout_value"] <= 0 for r in cell_rows):
        return True
    kappa = cell_rows[0]["kappa"]
    known = [r for r in cell_rows if r["heldout"] is not None and r["heldout_value"] and r["heldout"] != kappa]
    if not known:
        return False
    lower_is_better = (known[0]["heldout"] > kappa) == (known[0]["heldout_value"] > 0)
    return any(f["heldout"] <= kappa if lower_is_better else f["heldout"] >= kappa for f in frontier)


def table(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The markdown table and the rows with their derived columns."""
    fixed = [r for r in rows if r["controller"].startswith("fixed-")]
    out = []
    lines = [
        "| cell | κ | controller | seed | held-out | dev | KL | KL/front | max λ | final λ | sat@ | g/√v | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = [r for r in rows if not r["controller"].startswith("fixed-")]
    for r in sorted(runs, key=lambda r: (list(CELLS).index(r["cell"]), r["controller"], r["seed"])):
        dev = deviation(r)
        frontier = [f for f in fixed if f["cell"] == frontier_cell(CELLS[r["cell"]][0])]
        front = frontier_kl(frontier, r["heldout"]) if r["heldout"] is not None else None
        ratio = r["kl"] / front if front else None
        ceiling = r["max_lambda"] is not None and r["max_lambda"] >= 0.99e12
        in_reach = reachable([q for q in runs if q["cell"] == r["cell"]], frontier)
        ok = (
            dev is not None
            and -0.05 <= dev <= 0
            and (ratio is None or ratio <= 1.0)
            and not ceiling
            and r["adam_ratio"] is not None
            and r["adam_ratio"] >= 0.1
            and not r["diverged"]
        )
        r = {**r, "dev": dev, "kl_over_frontier": ratio, "reachable": in_reach, "meets_targets": ok and in_reach}
        verdict = ("yes" if ok else "no") if in_reach else "κ out of reach"
        out.append(r)
        lines.append(
            f"| {r['cell']} | {r['kappa']:g} | {r['controller']} | {r['seed']} | {_f(r['heldout'], '.4f')} | "
            f"{_f(dev, '+.1%')} | {r['kl']:.1f} | {_f(ratio, '.2f')} | {_f(r['max_lambda'], '.2g')} | "
            f"{_f(r['final_lambda'], '.2g')} | {r['first_satisfied'] if r['first_satisfied'] is not None else '-'} | "
            f"{_f(r['adam_ratio'], '.2f')} | {verdict} |"
        )
    out += sorted(fixed, key=lambda r: (r["cell"], float(r["controller"][6:])))
    return "\n".join(lines), out


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/multipliers")
    parser.add_argument("--cells", nargs="+", default=list(CELLS), help="cell names or prefixes")
    parser.add_argument("--controllers", nargs="+", default=list(CONTROLLERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--no-frontier", action="store_true", help="skip the fixed-lambda runs")
    parser.add_argument("--frontier", nargs="+", type=float, default=list(FRONTIER), help="its factors")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    args = parser.parse_args()
    cells = [c for c in CELLS if any(c == p or (p not in CELLS and c.startswith(p)) for p in args.cells)]
    jobs = [(c, label, s) for c in cells for label in args.controllers for s in args.seeds]
    if not args.no_frontier:
        configs = dict.fromkeys(frontier_cell(CELLS[c][0]) for c in cells)
        jobs += [(c, f"fixed-{f:g}", 0) for c in configs for f in args.frontier]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_cell, args.out, c, label, s, args.steps) for c, label, s in jobs]
        for fut in futures:
            r = fut.result()
            held = f"held-out {r['heldout']:.4f} (kappa {r['kappa']:g})"
            print(f"{r['cell']:>20} {r['controller']:>12} s{r['seed']}: {held}, KL {r['kl']:.1f}", flush=True)
    rows = [json.loads(p.read_text()) for p in Path(args.out).glob("*/*/bench.json")]
    text, derived = table(rows)
    (Path(args.out) / "multipliers.md").write_text(text + "\n")
    (Path(args.out) / "multipliers.json").write_text(json.dumps(derived, indent=1))
    print(text)


if __name__ == "__main__":
    main()
