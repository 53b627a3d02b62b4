"""`geco eval` of one run: where its time goes, the marginal KL against its own matrix products, and
(optionally) the whole command against another checkout of geco (e.g. the previous release).

    GECO_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval.py RUN_DIR \\
        [--old /path/to/old/checkout]

RUN_DIR is a run folder (e.g. from `geco train configs/mnist-geco-re.toml --set train.steps=500`).
With ``--old``, the same run is evaluated by that checkout's `geco eval` (its plugins from
``OLD/plugins/*``) and by this one's, each as a fresh process, alternately, 3 times each; train the
run with the old checkout then (this version reads an older run folder; the reverse is not true).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def breakdown(run_dir: str) -> None:
    import torch

    from geco_core.evaluation import average_kl, log_aggregate_density, log_density_matrix, sigma_opt
    from geco_core.evaluation.measures import BLOCK, _gaussian_factors, _subset, quantised_normal_log_prob
    from geco_core.training import Run, build
    from geco_core.training.experiment import PassMeasures, passes

    t = {}
    t0 = time.perf_counter()
    run = Run.open(run_dir)
    exp = build(run.config)
    exp.load_state_dict(run.load_checkpoint())
    split, heldout = exp.heldout
    t["load run, build, data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sigma = sigma_opt(exp, exp.data, _subset(len(exp.data), 1000, 0))
    t["sigma_opt (1000 train)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    measures = PassMeasures(exp)
    for batch, out in passes(exp, heldout, torch.arange(min(10_000, len(heldout)))):
        measures.add(batch, out)
        float(quantised_normal_log_prob(batch.x, out.x_hat, sigma).sum())
    t["held-out pass: NLL, RMSE, KL, constraints (10000)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    average_kl(exp, exp.data, _subset(len(exp.data), 10_000, 1))
    t["average KL, encoder only (10000 train)"] = time.perf_counter() - t0
    x = exp.data.batch(_subset(len(exp.data), 10_000, 2)).x
    with torch.no_grad():
        t0 = time.perf_counter()
        q = exp.model.posterior(x)
        z = q.sample()
        t["marginal KL: encoder (10000 train)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        log_aggregate_density(q, len(x), z)
        t["marginal KL: density matrix and log-mean-exp"] = time.perf_counter() - t0
        # the matrix products alone, as log_aggregate_density makes them: 64 draws x all examples a tile
        rows, columns = _gaussian_factors(q, z)
        rows = torch.cat([rows, rows[: -len(rows) % BLOCK]]).T.contiguous()
        out = torch.empty(64, rows.shape[1], dtype=torch.float64)
        t0 = time.perf_counter()
        for j in range(0, len(x), 64):
            torch.mm(columns[j : j + 64], rows, out=out[: len(columns[j : j + 64])])
        gemm = time.perf_counter() - t0
        t0 = time.perf_counter()  # and as the previous release made them: one product per 1000 draws
        for j in range(0, len(x), 1000):
            log_density_matrix(q, len(x), z[j : j + 1000])
        gemm_1000 = time.perf_counter() - t0
    total = sum(t.values())
    print(f"geco eval of {run_dir}, {torch.get_num_threads()} thread(s)")
    for k, v in t.items():
        print(f"  {k:52s} {v:7.2f} s")
    print(f"  {'total':52s} {total:7.2f} s")
    matrix = t["marginal KL: density matrix and log-mean-exp"]
    print(f"  marginal KL's matrix and log-mean-exp / its matrix products alone ({gemm:.3f} s): {matrix / gemm:.2f}")
    print(f"  ... / the same matrix as one product per 1000 draws ({gemm_1000:.3f} s): {matrix / gemm_1000:.2f}")


def against(run_dir: str, old: str) -> None:
    runs = Path(tempfile.mkdtemp())
    old_env = dict(os.environ)
    plugins = [str(Path(old) / "plugins" / p) for p in ("geco_re", "geco_cla", "geco_fre", "geco_pncc")]
    old_env["PYTHONPATH"] = os.pathsep.join([old, *plugins])
    old_env.pop("GECO_PLUGINS", None)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(3):
        for name in ("old", "new")[:: 1 if r % 2 == 0 else -1]:
            copy = runs / f"{name}-{r}"
            shutil.copytree(run_dir, copy)
            (copy / "eval.json").unlink(missing_ok=True)
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-W", "ignore", "-m", "geco_core.cli", "eval", str(copy)],
                env=old_env if name == "old" else os.environ, check=True, capture_output=True,
                cwd=runs,  # not the checkout: '' on sys.path would shadow the old one's PYTHONPATH
            )  # fmt: skip
            times[name].append(time.perf_counter() - t0)
    o, n = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"geco eval, whole command (median of 3): old {o:.1f} s, new {n:.1f} s, ratio new / old {n / o:.2f}")
    shutil.rmtree(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--old", help="a checkout of another geco version to compare the whole command with")
    args = parser.parse_args()
    breakdown(args.run_dir)
    if args.old:
        against(args.run_dir, args.old)


if __name__ == "__main__":
    main()
