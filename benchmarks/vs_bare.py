"""`geco train` against a bare PyTorch loop: the framework's tax on a training step.

    GECO_DATA=../shared/data .venv/bin/python benchmarks/vs_bare.py [--rounds 5] [--objective geco]

Both train the same network (geco's conv VAE, latent 16) on MNIST held in memory as uint8, batch
64, one epoch (937 steps), one thread, with the same fused Adam and the same allocator setting
(freed memory kept). The bare loop is what a user writes by hand: a random permutation, indexing,
``x / 255``, forward, the objective (GECO + RE, or the ELBO with a learned sigma), backward,
``opt.step()``; nothing else. geco's side is ``geco train``'s code (``geco_core.training.train``)
with every file but the metrics and the checkpoint at the end turned off (no TensorBoard, plots,
held-out evaluation, validation split), timed over its loop.

Two measurements, each ``--rounds`` times:

- fresh processes, alternately: images/s of the whole epoch, and of the steady state (the median
  10-step block of each process); each ratio is the median over rounds of the ratio of the two
  processes of a round, run back to back;
- one process, interleaved: the trainer runs its epoch, and after every 10 of its steps two
  hand-written loops (each with its own model, optimiser and data, in the same process) run 10
  steps each: the bare loop, and the README's loop (the bare loop with ``step_if_finite`` and
  ``follow``, the safety passes geco makes). All see the machine in the same state, so a machine
  whose speed drifts by more than the difference sought (a shared host) still gives a sharp
  ratio: the sum of a loop's blocks over the sum of geco's.

``--breakdown``: what each part of geco's step costs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, BLOCK = 937, 64, 10

SETUP = """
import json, sys, time, torch
torch.set_num_threads(1)
from geco_core.training.machine import keep_freed_memory
keep_freed_memory()
from geco_core import GECO, Batch, create_constraint, step_if_finite
from geco_core.data.mnist import mnist
from geco_core.models import ConvVAE
from geco_core.training.objectives import ELBO
torch.manual_seed(0)
images = mnist(split="train").images
order = torch.randperm(len(images))

def loop(safe):
    # a hand-written step on its own model, objective and optimiser; safe: with the README's two
    # lines, which skip a non-finite step and restart Adam after a multiplier restart
    model = ConvVAE((1, 28, 28), latent_dim=16)
    if sys.argv[1] == "geco":
        objective = GECO([create_constraint("re", kappa=0.1, image_shape=(1, 28, 28))], alpha=0.9)
        loss_of = lambda out, x: objective(out.kl, Batch(x=x, x_hat=out.x_hat))
    else:
        objective = ELBO()
        loss_of = lambda out, x: (objective.likelihood.nll(out, x) + out.kl).mean()
    params = [*model.parameters(), *(p for p in objective.parameters() if p.requires_grad)]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)

    def step_fn(step):
        i = step %% %(steps)d
        x = images[order[i * %(batch)d : (i + 1) * %(batch)d]].float().div_(255)
        loss = loss_of(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not safe:
            opt.step()
            return
        step_if_finite(opt, loss)
        if isinstance(objective, GECO):
            objective.follow(opt)

    return step_fn

bare_step = loop(safe=False)
"""

BARE = """
marks = [time.perf_counter()]
for step in range(%(steps)d):
    bare_step(step)
    if (step + 1) %% %(block)d == 0:
        marks.append(time.perf_counter())
seconds = time.perf_counter() - marks[0]
print(json.dumps({"seconds": seconds, "blocks": [b - a for a, b in zip(marks, marks[1:])]}))
"""

GECO = """
import json, sys, time
from geco_core.training import Callback, train

class Marks(Callback):
    def on_fit_start(self, trainer):
        self.marks = [time.perf_counter()]

    def on_step_end(self, trainer, metrics):
        if trainer.step %% %(block)d == 0:
            self.marks.append(time.perf_counter())

marks = Marks()
run = train(sys.argv[2], overrides=sys.argv[4:], run_dir=sys.argv[3], extra_callbacks=[marks])
seconds = json.loads((run / "summary.json").read_text())["seconds"]
print(json.dumps({"seconds": seconds, "blocks": [b - a for a, b in zip(marks.marks, marks.marks[1:])]}))
"""

INTERLEAVED = """
from geco_core.training import Callback, train

safe_step = loop(safe=True)

class Alternate(Callback):
    # after every block of the trainer's steps, as many steps of each hand-written loop; the times
    def on_fit_start(self, trainer):
        self.times, self.mark = {"geco": [], "bare": [], "safe": []}, time.perf_counter()

    def on_step_end(self, trainer, metrics):
        if trainer.step %% %(block)d == 0:
            self.times["geco"].append(time.perf_counter() - self.mark)
            for name, step_fn in (("bare", bare_step), ("safe", safe_step)):
                now = time.perf_counter()
                for step in range(trainer.step - %(block)d, trainer.step):
                    step_fn(step)
                self.times[name].append(time.perf_counter() - now)
            self.mark = time.perf_counter()

alternate = Alternate()
train(sys.argv[2], overrides=sys.argv[4:], run_dir=sys.argv[3], extra_callbacks=[alternate])
print(json.dumps(alternate.times))
"""


def _measure(code: str, args: list[str]) -> dict:
    """Run ``code`` in a fresh process with one OpenMP thread; what it printed last (JSON)."""
    code %= {"steps": STEPS, "batch": BATCH, "block": BLOCK}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sets(objective: str, steps: int, checkpoint_every: int) -> list[str]:
    """geco's side: the bare loop's network and data, no file but the metrics and checkpoints."""
    return [
        "model.latent_dim=16", f"objective.name='{objective}'", f"train.steps={steps}", f"train.batch_size={BATCH}",
        "train.threads=1", "train.validation=0", "logging.progress=false", "logging.plots=false",
        "logging.eval_examples=0", "logging.tensorboard=false", f"train.checkpoint_every={checkpoint_every}",
    ]  # fmt: skip


def _geco_args(out: str, objective: str) -> list[str]:
    sets = _sets(objective, STEPS, checkpoint_every=STEPS)
    return [objective, str(REPO / "configs" / "mnist-geco-re.toml"), out, *sets]


def breakdown(objective: str, rounds: int = 150) -> None:
    """What geco's step costs beyond the bare loop's, part by part: in one process, blocks of 10
    steps of the bare loop and of the trainer's own step (``Trainer.train_step``, and its record on
    every 10th step) whole or with one part switched off, interleaved; each part's cost is the
    median difference it makes between neighbouring blocks, in microseconds per step and as a share
    of the bare step."""
    from unittest import mock

    import torch

    from geco_core.training import Run, Trainer, build, load_config

    torch.set_num_threads(1)
    sets = [*_sets(objective, 100_000, checkpoint_every=100_000), f"train.log_every={BLOCK}"]
    config = load_config(REPO / "configs" / "mnist-geco-re.toml", sets)
    bare: dict = {}
    exec((SETUP % {"steps": STEPS, "batch": BATCH}).replace("sys.argv[1]", repr(objective)), bare)  # noqa: S102
    exp = build(config)
    trainer = Trainer(exp=exp, run=Run(Path(tempfile.mkdtemp()), config))
    trainer.reset_counts()

    def geco_step(step: int, records: bool = True) -> None:
        metrics = trainer.train_step(step, records and (step + 1) % BLOCK == 0)
        if metrics is not None:
            trainer.read_back(metrics)

    nothing = contextlib.nullcontext
    geco_class = type(exp.geco) if exp.geco is not None else object
    variants = {  # name: (what is switched off during the block, one step)
        "bare loop": (nothing, bare["bare_step"]),
        "geco's step": (nothing, geco_step),
        "the gradient check (norm, finiteness)": (
            lambda: mock.patch("geco_core.training.loop.grad_norm", lambda optimizer, clip: torch.zeros(())),
            geco_step,
        ),
        "the optimiser following a restart": (
            lambda: mock.patch.object(geco_class, "follow", lambda *a: None),
            geco_step,
        ),
        "a record every 10 steps (metrics, one read, GECO's state)": (nothing, lambda s: geco_step(s, records=False)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    step = 0
    for r in range(rounds):
        for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
            switched_off, step_fn = variants[name]
            with switched_off():
                start = time.perf_counter()
                for _ in range(BLOCK):
                    step_fn(step)
                    step += 1
                times[name].append(time.perf_counter() - start)
    median = statistics.median
    bare_us, geco_us = (median(times[k]) / BLOCK * 1e6 for k in ("bare loop", "geco's step"))
    print(f"per step (median of {rounds} interleaved blocks of {BLOCK}): bare {bare_us:.0f} us, geco {geco_us:.0f} us; "
          f"may_restart at the end: {getattr(exp.geco, 'may_restart', None)}")  # fmt: skip

    def cost(without: str) -> float:
        """geco's step minus ``without``'s, per step: the median over neighbouring blocks."""
        return median(g - b for g, b in zip(times["geco's step"], times[without])) / BLOCK * 1e6

    total, parts = cost("bare loop"), {name: cost(name) for name in list(variants)[2:]}
    parts["the rest (data, device counts, Python)"] = total - sum(parts.values())
    for name, us in {"all of it": total, **parts}.items():
        print(f"  {name:58s} {us:+7.0f} us  {us / bare_us:+.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--objective", default="geco", choices=["geco", "elbo"])
    parser.add_argument("--breakdown", action="store_true", help="the cost of each part of geco's step")
    args = parser.parse_args()
    if args.breakdown:
        breakdown(args.objective)
        return
    median = statistics.median
    runs: dict[str, list[dict]] = {"bare": [], "geco": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in ("bare", "geco")[:: 1 if r % 2 == 0 else -1]:
                code = SETUP + BARE if name == "bare" else GECO
                runs[name].append(_measure(code, _geco_args(str(Path(tmp) / f"{name}-{r}"), args.objective)))
                print(f"round {r}: {name} {STEPS * BATCH / runs[name][-1]['seconds']:.0f} images/s", flush=True)
        together = [
            _measure(SETUP + INTERLEAVED, _geco_args(str(Path(tmp) / f"together-{r}"), args.objective))
            for r in range(args.rounds)
        ]
    print(
        f"1 thread, conv VAE (latent 16), MNIST, batch {BATCH}, {STEPS} steps, {args.objective}, {args.rounds} rounds"
    )
    whole = {name: [STEPS * BATCH / run["seconds"] for run in v] for name, v in runs.items()}
    steady = {name: [BLOCK * BATCH / median(run["blocks"]) for run in v] for name, v in runs.items()}
    for label, rates in (("whole epoch", whole), ("steady state", steady)):
        ratio = median(g / b for g, b in zip(rates["geco"], rates["bare"]))
        print(f"  fresh processes, {label:12s}  bare {median(rates['bare']):5.0f} images/s  "
              f"geco {median(rates['geco']):5.0f} images/s  ratio geco / bare {ratio:.3f}")  # fmt: skip
    for base, label in (("bare", "the bare loop"), ("safe", "the bare loop with step_if_finite and follow")):
        ratios = [sum(t[base]) / sum(t["geco"]) for t in together]
        blocks = [median(b / g for g, b in zip(t["geco"], t[base])) for t in together]
        print(f"  one process, interleaved every {BLOCK} steps, against {label}: ratio geco / {base} "
              f"{median(ratios):.3f} (per process {' '.join(f'{r:.3f}' for r in ratios)}; median block "
              f"{median(blocks):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
