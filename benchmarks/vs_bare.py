"""`geco train` against a bare PyTorch loop: the framework's tax on a training step.

    GECO_DATA=../shared/data .venv/bin/python benchmarks/vs_bare.py [--rounds 5] [--objective geco]

Both train the same network (geco's conv VAE, latent 16) on MNIST held in memory as uint8, batch
64, one epoch (937 steps), one thread, with the same fused Adam and the same allocator setting
(freed memory kept), alternately in fresh processes. The bare loop is what a user writes by hand:
a random permutation, indexing, ``x / 255``, forward, the objective (GECO + RE, or the ELBO with
a learned sigma), backward, ``opt.step()``; nothing else. geco's side is ``geco train`` with every
file but the metrics and the checkpoint at the end turned off (no TensorBoard, plots, held-out
evaluation, validation split), the loop time its summary reports. Prints images/s, the ratio, and
a breakdown of geco's step into its parts (``--profile``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH = 937, 64

BARE = """
import json, sys, time, torch
torch.set_num_threads(1)
from geco_core.training.machine import keep_freed_memory
keep_freed_memory()
from geco_core import GECO, Batch, create_constraint
from geco_core.data.mnist import mnist
from geco_core.models import ConvVAE
from geco_core.training.objectives import ELBO
torch.manual_seed(0)
images = mnist(split="train").images
model = ConvVAE((1, 28, 28), latent_dim=16)
if sys.argv[1] == "geco":
    objective = GECO([create_constraint("re", kappa=0.1, image_shape=(1, 28, 28))], alpha=0.9)
    loss_of = lambda out, x: objective(out.kl, Batch(x=x, x_hat=out.x_hat))
else:
    objective = ELBO()
    loss_of = lambda out, x: (objective.likelihood.nll(out, x) + out.kl).mean()
params = [*model.parameters(), *(p for p in objective.parameters() if p.requires_grad)]
opt = torch.optim.Adam(params, lr=1e-3, fused=True)
order = torch.randperm(len(images))
start = time.perf_counter()
for step in range(%(steps)d):
    x = images[order[step * %(batch)d : (step + 1) * %(batch)d]].float().div_(255)
    loss = loss_of(model(x), x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
print(json.dumps({"images_per_s": %(steps)d * %(batch)d / (time.perf_counter() - start)}))
"""


def run_bare(objective: str) -> float:
    code = BARE % {"steps": STEPS, "batch": BATCH}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, objective], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]


def run_geco(out: str, objective: str) -> float:
    sets = [
        "model.latent_dim=16", f"objective.name='{objective}'", f"train.steps={STEPS}", f"train.batch_size={BATCH}",
        "train.threads=1", "train.validation=0", "logging.progress=false", "logging.plots=false",
        "logging.eval_examples=0", "logging.tensorboard=false", f"train.checkpoint_every={STEPS}",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "geco_core.cli", "train", str(REPO / "configs" / "mnist-geco-re.toml")]
    cmd += [a for s in sets for a in ("--set", s)] + ["--run-dir", out]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads((Path(out) / "summary.json").read_text())
    return STEPS * BATCH / summary["seconds"]


def profile(objective: str, steps: int = 300) -> None:
    """Where geco's step spends its time beyond the bare loop's: both in one process under torch's
    profiler, ``steps`` steps each after a warm-up; the operators whose time per step differs."""
    import torch

    from geco_core.training import Run, Trainer, build, load_config

    torch.set_num_threads(1)
    sets = [f"objective.name='{objective}'", "model.latent_dim=16", "train.validation=0", f"train.steps={steps}",
            "train.log_every=50", f"train.checkpoint_every={10 * steps}"]  # fmt: skip
    config = load_config(REPO / "configs" / "mnist-geco-re.toml", sets)
    bare: dict = {}
    setup = BARE.split("start = time.perf_counter()")[0].replace("sys.argv[1]", repr(objective))
    exec(setup, bare)  # noqa: S102 - the bare loop's own setup, in this process

    def bare_steps() -> None:
        images, model, opt, order, loss_of = (bare[k] for k in ("images", "model", "opt", "order", "loss_of"))
        for step in range(steps):
            x = images[order[step * BATCH : (step + 1) * BATCH]].float().div_(255)
            loss = loss_of(model(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    exp = build(config)
    per_step: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("bare", bare_steps), ("geco", lambda: Trainer(exp=exp, run=Run(Path(tmp), config)).fit(0))):
            run()  # warm
            with torch.profiler.profile() as prof:
                run()
            per_step[name] = {e.key: e.self_cpu_time_total / steps for e in prof.key_averages()}
    keys = sorted(set(per_step["bare"]) | set(per_step["geco"]), key=lambda k: -abs(
        per_step["geco"].get(k, 0) - per_step["bare"].get(k, 0)))  # fmt: skip
    total = {name: sum(v.values()) for name, v in per_step.items()}
    print(f"self CPU time per step: bare {total['bare']:.0f} us, geco {total['geco']:.0f} us "
          f"(ratio bare / geco {total['bare'] / total['geco']:.3f})")  # fmt: skip
    print(f"{'operator':50s} {'bare us':>9s} {'geco us':>9s} {'diff':>8s}")
    for k in keys[:20]:
        b, g = per_step["bare"].get(k, 0.0), per_step["geco"].get(k, 0.0)
        print(f"{k[:50]:50s} {b:9.1f} {g:9.1f} {g - b:+8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--objective", default="geco", choices=["geco", "elbo"])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.profile:
        profile(args.objective)
        return
    results: dict[str, list[float]] = {"bare": [], "geco": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in ("bare", "geco")[:: 1 if r % 2 == 0 else -1]:
                out = str(Path(tmp) / f"{name}-{r}")
                results[name].append(run_bare(args.objective) if name == "bare" else run_geco(out, args.objective))
                print(f"round {r}: {name} {results[name][-1]:.0f} images/s", flush=True)
    b, g = statistics.median(results["bare"]), statistics.median(results["geco"])
    print(f"1 thread, conv VAE (latent 16), MNIST, batch {BATCH}, {STEPS} steps, {args.objective}:")
    print(f"median of {args.rounds} rounds")
    print(f"  bare loop     {b:7.0f} images/s")
    print(f"  geco train    {g:7.0f} images/s    ratio geco / bare {g / b:.3f}")


if __name__ == "__main__":
    main()
