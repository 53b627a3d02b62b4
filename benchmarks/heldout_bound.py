"""Held-out kappa and GECO's validation bound: where held-out values end under other confidences.

    GECO_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/heldout_bound.py \\
        --runs runs/kbench/intervals [runs/bound-outside] [--steps 2000] [--trained 1.645] \\
        [--confidences 0 0.5 1 1.28 1.645] [--examples 0] [--rerun 1.0 --out runs/bound --jobs 2]

GECO drives ``c_ma + gap`` to 0, ``gap`` the validation mean plus ``z`` standard errors of it, minus
the training moving average (``validation_confidence``; ``--trained``: the ``z`` the runs were
trained with, default the current default). To first order a run trained with ``z'`` instead ends
with its held-out mean ``(z - z') * SE`` higher (in the constraint's units), ``SE`` the standard
error of the validation mean at the end. Per finished run in ``--runs`` (folders of run folders,
e.g. the intervals benchmark's; ``--steps``: only runs of that many steps; ``--only``: those named):
the validation split's and the held-out data's per-example values from its last checkpoint (the
first ``--examples`` held-out examples, 0: all), and, per candidate ``z'``, the held-out value so
predicted and its deviation from kappa (``dev``, signed: < 0 is the satisfied side); the count
within [-3%, +0.5%] of kappa. Writes ``RUNS/../heldout_bound.md`` (the first of ``--runs``).

``--rerun Z``: the same runs trained again with GECO's ``validation_confidence`` ``Z``
(``OUT/<run>``, cached), to check the prediction: held-out deviation and KL against the original runs.
"""

from __future__ import annotations

import argparse
import functools
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

EXAMPLES = 10_000  # held-out examples by default, as the runs' summaries measure them
LOW, HIGH = -0.03, 0.005  # the target band of dev


def measure(folder: str, examples: int = EXAMPLES) -> dict[str, Any]:
    """Per constraint component of the run's first constraint: kappa, tighter, the held-out mean
    over the first ``examples`` held-out examples (0: all), the validation standard error, KL; from
    the last checkpoint (cached in ``bound-<examples>.json``)."""
    import torch

    torch.set_num_threads(1)
    from geco_core.training import Run, build
    from geco_core.training.experiment import constraint_values

    cache = Path(folder) / f"bound-{examples}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    run = Run.open(folder)
    exp = build(run.config)
    exp.load_state_dict(run.load_checkpoint())
    val = constraint_values(exp, exp.validation, torch.arange(len(exp.validation))).double()
    _, data = exp.heldout
    held = constraint_values(exp, data, torch.arange(min(examples or len(data), len(data)))).double()
    constraint = exp.stack.constraints[0]
    row = {
        "run": Path(folder).name,
        "kappa": float(constraint.kappa),
        "tighter": int(constraint.tighter),
        "heldout_mean": float(held[:, 0].mean()),
        "se": float(val[:, 0].std() / len(val) ** 0.5),
        "kl": run.read_summary()["heldout"]["kl"],
    }
    cache.write_text(json.dumps(row))
    return row


@functools.cache
def _first_constraint(folder: str):
    """The run's first constraint, built once per run folder."""
    from geco_core.training import Run, build

    return build(Run.open(folder).config).stack.constraints[0]


def reached(folder: str, value: float) -> float:
    """The first constraint's value in kappa's units for a mean constraint value."""
    import torch

    return float(_first_constraint(folder).reached(torch.tensor([value], dtype=torch.float64))[0])


def dev(row: dict[str, Any], value: float) -> float:
    return row["tighter"] * (row["kappa"] - value) / row["kappa"]


def run_folders(runs: list[Path], steps: int | None, only: list[str] = ()) -> list[str]:
    """The finished runs in the folders ``runs`` (of ``steps`` steps; named in ``only``), by name."""
    folders = [p.parent for r in runs for p in r.glob("*/summary.json") if not only or p.parent.name in only]
    if steps is not None:
        folders = [f for f in folders if json.loads((f / "summary.json").read_text())["steps"] == steps]
    return [str(f) for f in sorted(folders, key=lambda f: f.name)]


def whatif(folders: list[str], confidences: list[float], jobs: int, examples: int, trained: float) -> str:
    with ProcessPoolExecutor(jobs) as pool:
        rows = list(pool.map(measure, folders, [examples] * len(folders)))
    head = "| run | κ | SE | " + " | ".join(f"dev at z {z:g}" for z in confidences) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(confidences)]
    inside = dict.fromkeys(confidences, 0)
    for folder, row in zip(folders, rows):
        cells = []
        for z in confidences:
            d = dev(row, reached(folder, row["heldout_mean"] + (trained - z) * row["se"]))
            inside[z] += LOW <= d <= HIGH
            cells.append(f"{d:+.1%}")
        lines.append(f"| {row['run']} | {row['kappa']:g} | {row['se']:.2e} | " + " | ".join(cells) + " |")
    lines.append(
        f"| within [{LOW:+.0%}, {HIGH:+.1%}] | | | "
        + " | ".join(f"{inside[z]} of {len(rows)}" for z in confidences)
        + " |"
    )
    return "\n".join(lines) + "\n"


def rerun(folder: str, out: str, z: float, examples: int) -> dict[str, Any]:
    """The run of ``folder`` trained again with GECO's validation confidence ``z`` (for every
    constraint that does not declare its own)."""
    import attrs
    import torch

    torch.set_num_threads(1)
    from geco_core.training import Run, train

    target = Path(out) / Path(folder).name
    if not (target / "summary.json").is_file():
        config = Run.open(folder).config
        options = {**config.objective.options, "validation_confidence": z}
        config = attrs.evolve(config, objective=attrs.evolve(config.objective, options=options))
        train(config=config, run_dir=target, extra_callbacks=[])
    return measure(str(target), examples)


def compare(folders: list[str], out: Path, z: float, jobs: int, examples: int, trained: float) -> str:
    with ProcessPoolExecutor(jobs) as pool:
        n = len(folders)
        new = list(pool.map(rerun, folders, [str(out)] * n, [z] * n, [examples] * n))
        old = list(pool.map(measure, folders, [examples] * n))
    lines = [
        f"| run | κ | dev at {trained:g} | dev at {z:g} | KL at {trained:g} | KL at {z:g} | KL ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    inside = [0, 0]
    for folder, a, b in zip(folders, old, new):
        da = dev(a, reached(folder, a["heldout_mean"]))
        db = dev(b, reached(folder, b["heldout_mean"]))
        inside[0] += LOW <= da <= HIGH
        inside[1] += LOW <= db <= HIGH
        lines.append(
            f"| {a['run']} | {a['kappa']:g} | {da:+.1%} | {db:+.1%} | {a['kl']:.1f} | {b['kl']:.1f} | "
            f"{b['kl'] / a['kl']:.3f} |"
        )
    lines.append(
        f"| within [{LOW:+.0%}, {HIGH:+.1%}] | | {inside[0]} of {len(old)} | {inside[1]} of {len(new)} | | | |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["runs/kbench/intervals"])
    parser.add_argument("--steps", type=int, help="only runs of this many steps")
    parser.add_argument("--confidences", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.28, 1.645])
    parser.add_argument("--trained", type=float, help="the confidence the runs were trained with (default: today's)")
    parser.add_argument("--rerun", type=float, help="train the runs again at this confidence and compare")
    parser.add_argument("--out", default="runs/bound")
    parser.add_argument("--only", nargs="+", default=[], help="only these runs (folder names)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--examples", type=int, default=EXAMPLES, help="held-out examples measured (0: all)")
    args = parser.parse_args()
    runs = [Path(r) for r in args.runs]
    folders = run_folders(runs, args.steps, args.only)
    from geco_core.constraint import CONFIDENCE

    trained = CONFIDENCE if args.trained is None else args.trained
    if args.rerun is None:
        text = whatif(folders, args.confidences, args.jobs, args.examples, trained)
        (runs[0].parent / "heldout_bound.md").write_text(text)
    else:
        text = compare(folders, Path(args.out), args.rerun, args.jobs, args.examples, trained)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "heldout_bound.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
