"""The kappa finder, measured: what ``geco find-kappa`` predicts against what GECO runs and fixed
multipliers reach at the same budget.

    GECO_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kappa_finder.py \\
        --out runs/multipliers --jobs 2 [--configs mnist-geco-re] [--steps 2000]

Per config (``CONFIGS``, each with three kappa, one near the floor): one finder run of ``--steps``
steps predicting for runs of as many steps; a GECO run (the default controller) at each kappa; and
fixed multipliers (``FIXED``: lambda = factor * the natural scale, never moving; the multiplier
benchmark's frontier, shared with it through ``--out``). Reports:

* per kappa: the KL the finder predicts against the held-out KL of the GECO run (target: within
  +-25%), and the GECO run's held-out value;
* the finder's reachable floor against the best held-out value any fixed lambda or GECO run of the
  config reached (target: within 3%, in kappa's units);
* the suggested kappa and the fixed-lambda frontier's KL there; the finder's wall time against a
  GECO run's (target: at most one run).

Runs are cached (``bench.json``, ``kappa.json``) and reused by a second invocation. Writes
``OUT/kappa_finder.md`` and ``OUT/kappa_finder.json``.

With ``--lengths 300 1000 2000``: the finder at each length on each of ``LENGTH_CELLS`` (the shipped
RE, pNCC and SSIM configs as shipped, and Fashion-MNIST, which no config ships), its floor at each
of ``--budgets`` against the longest finder's, and whether it says "cannot tell" instead
(``OUT/lengths/``, ``OUT/kappa_lengths.md``).

With ``--intervals``: on each of ``LENGTH_CELLS``, the finder ``geco find-kappa`` runs by default for
a budget (from ``--lengths``'s folder: 1000 steps for a budget of 1000, 2000 otherwise) and a GECO
run (the config as shipped, ``--interval-budgets`` steps, 2000 by default) at kappa = the floor +
each of ``SLACKS`` (``--slacks``) times the knee's distance to it, floor and knee for that budget;
each GECO run's held-out KL against the predicted KL and its interval, by where the prediction comes
from, and the coverage per budget (``OUT/intervals/``, ``OUT/kappa_intervals.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from geco_core.evaluation.kappa import Finding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multipliers import REPO, cell_config, frontier_cell, frontier_kl, run_cell  # noqa: E402

#: config stem -> the multiplier benchmark's cells of three kappa, the first near the reachable floor
CONFIGS: dict[str, tuple[str, str, str]] = {
    "mnist-geco-re": ("mnist-k0.07", "mnist-k0.085", "mnist-k0.1"),
    "color-mnist-geco-re": ("color-mnist-k0.11", "color-mnist-k0.125", "color-mnist-k0.15"),
    "mnist-geco-pncc": ("pncc-k0.93", "pncc-k0.9", "pncc"),
    "mnist-geco-fre": ("fre-k0.25", "fre-k0.3", "fre"),
}
#: per config, a GECO run at a kappa out of reach: lambda climbs to its ceiling, the run that pushes
#: hardest at this budget (the floor's truth: the best any fixed lambda or GECO run reaches)
OUT_OF_REACH = {
    "mnist-geco-re": "mnist-k0.06",
    "color-mnist-geco-re": "color-mnist-k0.1",
    "mnist-geco-pncc": "pncc-k0.97",
    "mnist-geco-fre": "fre-k0.15",
}
#: the finder-length benchmark's cells: name -> (config, overrides)
LENGTH_CELLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mnist-geco-re": ("mnist-geco-re.toml", ()),
    "fashion-re": ("mnist-geco-re.toml", ("data.name=fashion-mnist",)),
    "color-mnist-geco-re": ("color-mnist-geco-re.toml", ()),
    "mnist-geco-pncc": ("mnist-geco-pncc.toml", ()),
    "mnist-geco-ssim": ("mnist-geco-ssim.toml", ()),
}
#: the intervals benchmark's kappa: the floor + factor * (knee - floor), tight to loose
SLACKS = (0.5, 1.0, 1.5, 2.5, 4.0)
#: fixed lambda = factor * natural scale: the multiplier benchmark's frontier and a high one
FIXED = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)


def run_finder(out: str, stem: str, steps: int) -> dict[str, Any]:
    """The finder on the config as the benchmark runs it (alpha 0.9, ``steps`` steps); cached."""
    import torch

    torch.set_num_threads(1)
    from geco_core.evaluation.kappa import find_kappa
    from geco_core.training import Config

    folder = Path(out) / f"finder-{stem}"
    if (folder / "kappa.json").is_file():
        return json.loads((folder / "kappa.json").read_text())
    doc = cell_config(frontier_cell(f"{stem}.toml"), "restart", 0, steps)
    doc["logging"]["progress"] = False
    t0 = time.perf_counter()
    result = find_kappa(config=Config.from_dict(doc), run_dir=folder).to_json()
    result["wall_seconds"] = time.perf_counter() - t0
    (folder / "kappa.json").write_text(json.dumps(result, indent=1))
    return result


def _timed_geco(out: str, name: str, steps: int) -> dict[str, Any]:
    """A GECO run of the default controller at a cell, with its wall time (setup and final
    evaluation included) where it was trained now."""
    path = Path(out) / name / "restart-s0" / "bench.json"
    fresh = not path.is_file()
    t0 = time.perf_counter()
    row = run_cell(out, name, "restart", 0, steps)
    if fresh:
        row["wall_seconds"] = time.perf_counter() - t0
        path.write_text(json.dumps(row, indent=1))
    return row


def report(out: Path, steps: int) -> tuple[str, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    lines = [
        "| config | κ | GECO held-out | GECO KL | predicted KL | predicted / GECO | within ±25% |",
        "|---|---|---|---|---|---|---|",
    ]
    floors = [
        "| config | finder floor | best held-out (any fixed λ or GECO run) | by | difference | within 3% |",
        "|---|---|---|---|---|---|",
    ]
    knees = [
        "| config | suggested κ | frontier KL there | finder s | GECO run s | finder / run |",
        "|---|---|---|---|---|---|",
    ]
    from geco_core.evaluation.kappa import analyse, predict_kl

    for stem, cells in CONFIGS.items():
        finder_path = out / f"finder-{stem}" / "kappa.json"
        if not finder_path.is_file():
            continue
        finder = json.loads(finder_path.read_text())  # analysed again: the points are what was measured
        analysed = analyse(finder["points"], finder["constraints"], finder["budget"], finder["hold_steps"])
        name, c = next(iter(analysed.items()))
        direction = c.tighter
        geco_rows, fixed_rows = [], []
        for name_ in cells:
            path = out / name_ / "restart-s0" / "bench.json"
            if path.is_file():
                geco_rows.append(json.loads(path.read_text()))
        pushed = out / OUT_OF_REACH[stem] / "restart-s0" / "bench.json"
        pushing = [json.loads(pushed.read_text())] if pushed.is_file() else []
        for factor in FIXED:
            path = out / frontier_cell(f"{stem}.toml") / f"fixed-{factor:g}-s0" / "bench.json"
            if path.is_file():
                fixed_rows.append(json.loads(path.read_text()))
        for g in geco_rows:
            predicted = predict_kl(c, g["kappa"])
            ratio = predicted / g["kl"] if predicted and g["kl"] > 0 else None
            ok = ratio is not None and 0.75 <= ratio <= 1.25
            rows.append({"config": stem, "kappa": g["kappa"], "geco": g, "predicted_kl": predicted, "ratio": ratio})
            lines.append(
                f"| {stem} | {g['kappa']:g} | {g['heldout']:.4f} | {g['kl']:.1f} | {_f(predicted, '.1f')} | "
                f"{_f(ratio, '.2f')} | {'yes' if ok else 'no'} |"
            )
        reached = [(r["heldout"], f"fixed {r['controller'][6:]}") for r in fixed_rows] + [
            (r["heldout"], f"GECO κ {r['kappa']:g}") for r in [*geco_rows, *pushing]
        ]
        if reached and c.floor is not None:
            best, by = min(reached, key=lambda r: direction * -r[0])
            diff = (c.floor - best) / best
            verdict = "yes" if abs(diff) <= 0.03 else "no"
            floors.append(f"| {stem} | {c.floor:.4f} | {best:.4f} | {by} | {diff:+.1%} | {verdict} |")
            rows.append({"config": stem, "floor": c.floor, "best": best, "by": by, "difference": diff})
        front = frontier_kl(fixed_rows, c.suggested_kappa) if c.suggested_kappa is not None else None
        geco_seconds = [g.get("wall_seconds") or g["seconds"] for g in geco_rows]
        run_s = sum(geco_seconds) / len(geco_seconds) if geco_seconds else None
        finder_s = finder.get("wall_seconds")
        knees.append(
            f"| {stem} | {_f(c.suggested_kappa, '.4g')} | {_f(front, '.1f')} | {_f(finder_s, '.0f')} | "
            f"{_f(run_s, '.0f')} | {_f(finder_s / run_s if finder_s and run_s else None, '.2f')} |"
        )
    text = "\n".join(lines) + "\n\n" + "\n".join(floors) + "\n\n" + "\n".join(knees) + "\n"
    return text, rows


def run_length(out: str, cell: str, steps: int) -> None:
    """One finder of ``steps`` on a length cell (predicting for 2000 steps; re-analysed per budget); cached."""
    import torch

    torch.set_num_threads(1)
    from geco_core.evaluation.kappa import find_kappa

    folder = Path(out) / "lengths" / f"{cell}-{steps}"
    if (folder / "kappa.json").is_file():
        return
    path, overrides = LENGTH_CELLS[cell]
    settings = ["train.steps=2000", "logging.progress=false", f"logging.dir='{Path(out) / 'lengths'}'"]
    find_kappa(REPO / "configs" / path, overrides=[*settings, *overrides], steps=steps, run_dir=folder)


def reanalysed(result: dict[str, Any], budget: int) -> Finding:
    """A finder result's (only) constraint analysed again from its probes, for ``budget`` steps."""
    from geco_core.evaluation.kappa import analyse

    keys = ("units", "kappa", "tighter", "direction", "perfect")
    meta = {name: {k: c[k] for k in keys if k in c} for name, c in result["constraints"].items()}
    (c,) = analyse(result["points"], meta, budget, result["hold_steps"]).values()
    return c


def budget_finder(out: str | Path, cell: str, budget: int) -> Finding | None:
    """The finding of the finder ``geco find-kappa`` runs by default for ``budget`` steps (its length
    ``default_steps(budget)``: 1000 steps for a budget of 1000, else 2000), from the length benchmark's
    folder, analysed for ``budget``; None where that finder has not run."""
    from geco_core.evaluation.kappa import default_steps

    path = Path(out) / "lengths" / f"{cell}-{default_steps(budget)}" / "kappa.json"
    return reanalysed(json.loads(path.read_text()), budget) if path.is_file() else None


def interval_kappas(out: str, cell: str, budget: int = 2000, slacks: tuple[float, ...] = SLACKS) -> list[float]:
    """The intervals benchmark's kappa for ``budget``: the default finder's floor and knee for it."""
    c = budget_finder(out, cell, budget)
    floor, knee = c.floor, c.suggested_kappa
    return [float(f"{floor + f * (knee - floor):.4g}") for f in slacks]


def interval_folder(out: str | Path, cell: str, kappa: float, budget: int = 2000) -> Path:
    return Path(out) / "intervals" / f"{cell}{'' if budget == 2000 else f'-b{budget}'}-k{kappa:g}"


def run_interval(out: str, cell: str, kappa: float, budget: int = 2000) -> dict[str, Any]:
    """One GECO run of a length cell's config at ``kappa`` for ``budget`` steps (as shipped
    otherwise); cached."""
    import torch

    torch.set_num_threads(1)
    from geco_core.training import Run, train

    folder = interval_folder(out, cell, kappa, budget)
    if not (folder / "summary.json").is_file():
        path, overrides = LENGTH_CELLS[cell]
        quiet = ["logging.progress=false", "logging.plots=false", "logging.tensorboard=false"]
        sets = [f"train.steps={budget}", f"constraints.0.kappa={kappa}", *quiet, "logging.eval_examples=2000"]
        sets += overrides
        train(REPO / "configs" / path, overrides=sets, run_dir=folder)
    summary = Run.open(folder).read_summary()
    first = summary["constraints"][0]
    return {
        "cell": cell,
        "kappa": kappa,
        "budget": budget,
        "kl": summary["heldout"]["kl"],
        "heldout": first.heldout_reached,
    }


def intervals_report(out: Path) -> str:
    """Per budget, cell and kappa: the GECO run's held-out KL against the prediction of the finder
    ``geco find-kappa`` runs by default for that budget, and its interval; the coverage per budget."""
    from geco_core.evaluation.kappa import predict

    lines = ["| budget | cell | κ | GECO held-out | GECO KL | predicted KL | from | interval | GECO / predicted "
             "| inside |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    coverage: dict[int, list[bool]] = {}
    rows = [json.loads(p.read_text()) for p in sorted((out / "intervals").glob("*/bench.json"))]
    for budget in sorted({r.get("budget", 2000) for r in rows}):
        for cell in LENGTH_CELLS:
            c = budget_finder(out, cell, budget)
            if c is None:
                continue
            for g in sorted((r for r in rows if r["cell"] == cell and r.get("budget", 2000) == budget),
                            key=lambda r: r["kappa"]):  # fmt: skip
                p = predict(c, g["kappa"])
                head = f"| {budget} | {cell} | {g['kappa']:g} | {g['heldout']:.4f} | {g['kl']:.1f} |"
                if p.kl is None:
                    lines.append(f"{head} - | {p.where} | - | - | - |")
                    continue
                inside = p.low <= g["kl"] <= p.high
                coverage.setdefault(budget, []).append(inside)
                lines.append(
                    f"{head} {p.kl:.1f} | {p.where} | {p.low:.1f}–{p.high:.1f} | {g['kl'] / p.kl:.2f} | "
                    f"{'yes' if inside else '**no**'} |"
                )
    lines += ["", "| budget | GECO runs inside the interval |", "|---|---|"]
    lines += [f"| {b} | {sum(v)} of {len(v)} |" for b, v in sorted(coverage.items())]
    return "\n".join(lines) + "\n"


def lengths_report(out: Path, lengths: list[int], budgets: list[int]) -> str:
    """Per cell and budget: each finder's floor (re-analysed at the budget) against the longest's."""
    longest = max(lengths)
    lines = [
        "| cell | budget | " + " | ".join(f"{n} steps" for n in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for cell in LENGTH_CELLS:
        results = {}
        for n in lengths:
            path = out / "lengths" / f"{cell}-{n}" / "kappa.json"
            if path.is_file():
                results[n] = json.loads(path.read_text())
        for budget in budgets:
            floors = {n: reanalysed(r, budget) for n, r in results.items()}
            ref = floors[longest].floor if longest in floors else None
            cells = []
            for n in lengths:
                c = floors.get(n)
                if c is None:
                    cells.append("-")
                elif c.floor is None:
                    cells.append("cannot tell")
                elif n == longest or ref is None:
                    cells.append(f"{c.floor:.4g} ({c.floor_status})")
                else:
                    cells.append(f"{c.floor:.4g} ({(c.floor - ref) / ref:+.1%})")
            lines.append(f"| {cell} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/multipliers")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--lengths", type=int, nargs="+", help="the finder-length benchmark instead (module docstring)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 2000, 3000, 5000])
    parser.add_argument("--intervals", action="store_true", help="the intervals benchmark instead (module docstring)")
    parser.add_argument("--interval-budgets", type=int, nargs="+", default=[2000], help="GECO runs' steps (intervals)")
    parser.add_argument(
        "--slacks", type=float, nargs="+", help=f"kappa in knee distances (intervals; default {SLACKS})"
    )
    args = parser.parse_args()
    if args.intervals:
        from geco_core.evaluation.kappa import default_steps

        slacks = tuple(args.slacks or SLACKS)
        lengths = {2000, *(default_steps(b) for b in args.interval_budgets)}  # the finders each budget reads
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            jobs = [pool.submit(run_length, args.out, cell, n) for n in lengths for cell in LENGTH_CELLS]
            for job in jobs:
                job.result()
            cells = [
                (cell, k, b)
                for b in args.interval_budgets
                for cell in LENGTH_CELLS
                for k in interval_kappas(args.out, cell, b, slacks)
            ]
            jobs = [pool.submit(run_interval, args.out, cell, k, b) for cell, k, b in cells]
            for (cell, k, b), job in zip(cells, jobs):
                row = job.result()
                (interval_folder(args.out, cell, k, b) / "bench.json").write_text(json.dumps(row))
                print("done:", cell, k, b, flush=True)
        text = intervals_report(Path(args.out))
        (Path(args.out) / "kappa_intervals.md").write_text(text)
        print(text)
        return
    if args.lengths:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            jobs = [pool.submit(run_length, args.out, cell, n) for n in args.lengths for cell in LENGTH_CELLS]
            for job in jobs:
                job.result()
        text = lengths_report(Path(args.out), args.lengths, args.budgets)
        (Path(args.out) / "kappa_lengths.md").write_text(text)
        print(text)
        return
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = []
        for stem in args.configs:
            futures.append(pool.submit(run_finder, args.out, stem, args.steps))
            cells = [*CONFIGS[stem], OUT_OF_REACH[stem]]
            futures += [pool.submit(_timed_geco, args.out, name, args.steps) for name in cells]
            futures += [
                pool.submit(run_cell, args.out, frontier_cell(f"{stem}.toml"), f"fixed-{f:g}", 0, args.steps)
                for f in FIXED
            ]
        for fut in futures:
            fut.result()
            print("done:", len([f for f in futures if f.done()]), "of", len(futures), flush=True)
    text, rows = report(Path(args.out), args.steps)
    (Path(args.out) / "kappa_finder.md").write_text(text)
    (Path(args.out) / "kappa_finder.json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
