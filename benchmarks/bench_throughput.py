"""Throughput of the training step: Adam's implementations, threads on a shared CPU, image size and
batch (with and without keeping freed memory), and torch.compile.

    .venv/bin/python benchmarks/bench_throughput.py adam      # Adam: per-parameter loop, foreach, fused
    .venv/bin/python benchmarks/bench_throughput.py threads   # 1 vs 2 threads, OpenMP wait policy, a busy core
    .venv/bin/python benchmarks/bench_throughput.py scaling   # images/s: 28/32/64 px x batch 16..512
    .venv/bin/python benchmarks/bench_throughput.py compile   # the trainer's step: eager vs compiled whole
    .venv/bin/python benchmarks/bench_throughput.py validation   # the loop with and without validation

The model is the quickstart's (conv VAE, latent 16) with GECO + test-mae (an L1 constraint that costs
what RE does). Variants alternate within one run and ratios are reported; each configuration that
needs its own OpenMP setting runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("GECO_PLUGINS", "geco_core.testing")


def make_step(shape, batch: int, adam: str = "fused", compile_model: bool = False):
    """A training step of the conv VAE with GECO on random images; returns (step, optimizer)."""
    import torch

    from geco_core import GECO, Batch, create, create_constraint

    torch.manual_seed(0)
    model = create("model", "conv-vae", image_shape=tuple(shape))
    forward = torch.compile(model) if compile_model else model
    options = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[adam]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **options)
    geco = GECO([create_constraint("test-mae", kappa=0.1, image_shape=tuple(shape))], alpha=0.9)
    x = torch.rand(batch, *shape)

    def step() -> None:
        out = forward(x)
        loss = geco(out.kl, Batch(x, out.x_hat))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, opt


def timed(fn, seconds: float) -> float:
    """Median seconds per call over about ``seconds`` of calls (after two warm-up calls)."""
    fn()
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def adam(args) -> None:
    import torch

    torch.set_num_threads(1)
    variants = {name: make_step((3, 32, 32), 64, adam=name) for name in ("loop", "foreach", "fused")}
    step_t = {n: [] for n in variants}
    opt_t = {n: [] for n in variants}
    for r in range(args.rounds):
        for name, (step, opt) in list(variants.items())[:: 1 if r % 2 == 0 else -1]:
            step_t[name].append(timed(step, args.seconds))
            opt_t[name].append(timed(opt.step, args.seconds / 2))
    base = statistics.median(step_t["loop"])
    print("1 thread, conv VAE on 3x32x32, batch 64, GECO; medians over", args.rounds, "alternating rounds")
    print(f"{'Adam':10s} {'adam.step (ms)':>15s} {'whole step (ms)':>16s} {'step / loop':>12s}")
    for name in variants:
        s, o = statistics.median(step_t[name]), statistics.median(opt_t[name])
        print(f"{name:10s} {o * 1e3:15.2f} {s * 1e3:16.2f} {s / base:12.3f}")


THREAD_CASES = [  # (label, threads, OMP_WAIT_POLICY or None for unset, busy core)
    ("1 thread", 1, None, False),
    ("2 threads, default wait", 2, None, False),
    ("2 threads, PASSIVE", 2, "PASSIVE", False),
    ("1 thread, other core busy", 1, None, True),
    ("2 threads, default wait, other core busy", 2, None, True),
    ("2 threads, ACTIVE, other core busy", 2, "ACTIVE", True),
    ("2 threads, PASSIVE, other core busy", 2, "PASSIVE", True),
    ("geco's default: free cores, PASSIVE", "auto", "PASSIVE", False),
    ("geco's default: free cores, PASSIVE, other core busy", "auto", "PASSIVE", True),
]


def threads(args) -> None:
    results = {}
    for label, n, policy, busy in THREAD_CASES:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        hog = None
        if busy:  # a process that keeps one core busy, as another user's job would
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        try:
            out = subprocess.run(
                [sys.executable, __file__, "_thread_worker", str(n), str(args.seconds)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        results[label] = float(out.stdout.strip())
    base = results["1 thread"]
    print("conv VAE on 3x32x32, batch 64, GECO; step median; one process per case")
    print(f"{'case':45s} {'step (ms)':>10s} {'/ 1 thread':>11s}")
    for label, value in results.items():
        print(f"{label:45s} {value * 1e3:10.1f} {value / base:11.2f}")


def _thread_worker(n: str, seconds: str) -> None:
    import torch  # before geco_core: the OpenMP wait policy is what the environment says

    if n == "auto":  # what build() does when train.threads is not set
        from geco_core.training.machine import free_cores

        torch.set_num_threads(min(torch.get_num_threads(), free_cores()))
    else:
        torch.set_num_threads(int(n))
    step, _ = make_step((3, 32, 32), 64)
    print(timed(step, float(seconds)))


def scaling(args) -> None:
    rows = []
    for size in (28, 32, 64):
        for batch in (16, 64, 128, 256, 512):
            row = {"size": size, "batch": batch}
            for keep in (False, True):
                worker = ["_scaling_worker", str(size), str(batch), str(int(keep)), str(args.seconds)]
                out = subprocess.run([sys.executable, __file__, *worker], capture_output=True, text=True, check=True)
                row["kept" if keep else "default"] = batch / float(out.stdout.strip())
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"threads {args.threads}; images/s of a training step (conv VAE, GECO), glibc default vs freed memory kept")
    print(f"{'image':>9s} {'batch':>6s} {'default':>9s} {'kept':>9s} {'ratio':>6s}")
    for r in rows:
        image = f"3x{r['size']}x{r['size']}"
        print(f"{image:>9s} {r['batch']:6d} {r['default']:9.0f} {r['kept']:9.0f} {r['kept'] / r['default']:6.2f}")


def _scaling_worker(size: str, batch: str, keep: str, seconds: str) -> None:
    import torch

    from geco_core.training.machine import keep_freed_memory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if keep == "1":
        assert keep_freed_memory()
    step, _ = make_step((3, int(size), int(size)), int(batch))
    print(timed(step, float(seconds)))


def trainer_step(batch: int, compile_step: bool):
    """The trainer's own step (geco_core.training.Trainer.train_step) on the quickstart config
    (conv VAE, 3x32x32, GECO + RE's stand-in test-mae), eager or compiled whole."""
    import tempfile
    from pathlib import Path

    from geco_core.training import Run, Trainer, build, load_config

    sets = [
        f"train.batch_size={batch}", f"train.compile={str(compile_step).lower()}", "train.validation=0",
        "train.threads=1", "constraints.0.name='test-mae'", "data.n=4096",
    ]  # fmt: skip
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml", sets)
    exp = build(config)
    trainer = Trainer(exp=exp, run=Run(Path(tempfile.mkdtemp()), config), callbacks=[])
    trainer.reset_counts()
    exp.model.train()
    exp.objective.train()
    steps = iter(range(10**9))
    return lambda: trainer.train_step(next(steps), False)


def compile_(args) -> None:
    import torch

    torch.set_num_threads(1)
    for batch in (64, 256):
        t0 = time.perf_counter()
        compiled = trainer_step(batch, True)
        compiled()
        warm = time.perf_counter() - t0
        eager = trainer_step(batch, False)
        e, c = [], []
        for r in range(args.rounds):
            for name, fn in [("eager", eager), ("compiled", compiled)][:: 1 if r % 2 == 0 else -1]:
                (e if name == "eager" else c).append(timed(fn, args.seconds))
        e, c = statistics.median(e), statistics.median(c)
        line = f"1 thread, the trainer's step, conv VAE on 3x32x32, batch {batch}: eager {e * 1e3:.2f} ms, "
        print(line + f"compiled whole {c * 1e3:.2f} ms (ratio {c / e:.3f}); compiling took {warm:.0f} s", flush=True)


def validation_(args) -> None:
    """The trainer's loop (800 steps of MNIST's conv VAE, GECO + RE) with the validation split
    measured every 200 steps (1000 examples) against without, alternately in one process."""
    import tempfile
    from pathlib import Path

    import torch

    from geco_core.training import Run, Trainer, build, load_config

    torch.set_num_threads(1)
    repo = Path(__file__).resolve().parents[1]
    times: dict[int, list[float]] = {0: [], 1000: []}
    for r in range(args.rounds):
        for held in (0, 1000)[:: 1 if r % 2 == 0 else -1]:
            sets = ["train.steps=800", f"train.validation={held}", "train.threads=1", "train.log_every=800"]
            config = load_config(repo / "configs" / "mnist-geco-re.toml", sets)
            exp = build(config)
            trainer = Trainer(exp=exp, run=Run(Path(tempfile.mkdtemp()), config), callbacks=[])
            t0 = time.perf_counter()
            trainer.fit(0)
            times[held].append(time.perf_counter() - t0)
    plain, validated = statistics.median(times[0]), statistics.median(times[1000])
    print(f"1 thread, MNIST conv VAE + RE, 800 steps: {plain:.1f} s without validation, {validated:.1f} s with "
          f"1000 examples every 200 steps: +{validated / plain - 1:.1%}")  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        globals()[sys.argv[1]](*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["adam", "threads", "scaling", "compile", "validation"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=1, help="scaling: torch threads")
    args = parser.parse_args()
    os.environ["BENCH_THREADS"] = str(args.threads)
    modes = {"adam": adam, "threads": threads, "scaling": scaling, "compile": compile_, "validation": validation_}
    modes[args.what](args)


if __name__ == "__main__":
    main()
