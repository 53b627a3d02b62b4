"""Which classifier makes CLA mean "a person reads the digit": GECO + CLA runs under candidate
networks, judged by networks that did not shape the reconstructions. It decides the shipped network.

    GECO_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cla_networks.py \\
        --out runs/cla --jobs 2 --steps 3000 [--guard 0.2] \\
        --network standard=standard --network fgsm-rs=path/to/fgsm.safetensors ...

A network is a name CLA's ``weights`` accepts (``shipped``, ``standard``, ...) or a safetensors file
written by ``python -m geco_cla.train`` (its metadata gives the recipe and clean accuracy), followed
by CLA's numeric options (``,smoothing=0.3``: noise of that std added to the reconstruction before the
classifier; ``,validation_confidence=0.5``).
Each is used by CLA (kappa ``--kappa``, log form) on the conv VAE of configs/mnist-geco-cla.toml,
alone or (``--guard``) stacked with RE at that kappa, for ``--steps`` steps. On the first 2000
held-out digits:

* ``p own``: the held-out geometric mean of p(true digit) under the network CLA used;
* ``clean``, ``PGD-40``: test accuracy on clean digits (recorded in the file) and under a 40-step
  L-inf PGD attack at 0.3 (first 1000 test digits, measured here);
* ``judges``: top-1 accuracy of the reconstructions under the standard classifier, its twin, and an
  MLP trained here (another architecture; 784-256-10, two epochs); none of them shaped the
  reconstructions unless it is the network CLA used (marked);
* ``RMSE``: held-out pixel RMSE; ``KL``: held-out nats per example;
* ``FD rec`` / ``FD smp``: Fréchet distances of reconstructions / prior samples to the test digits in
  the ``digits`` features (geco_core.evaluation.realism; real test digits against each other: ~0.4).

``--start mean`` starts the conv VAE's reconstructions at the mean training image (its
``output_start``). Runs go to ``OUT/<name>-<steps>[-guard][-mean][-seed<S>]`` (``--seeds``: the
runs' ``train.seed``), a grid of reconstructions beside each; ``OUT/cla.md`` and ``OUT/cla.json``
hold the table. Finished runs are reused, interrupted ones resumed; ``--table``
prints the table of every finished run in ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = 2000


def mlp_judge(out: Path):
    """An MLP digit classifier (another architecture than CLA's), trained once and cached."""
    import torch
    from torch import nn

    from geco_core import create
    from geco_core.training import accuracy, train_classifier

    path = out / "mlp_judge.pt"
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    train = create("dataset", "mnist", split="train", download=False)
    test = create("dataset", "mnist", split="test", download=False)
    train_classifier(model, train, test, epochs=2, lr=3e-3, log=lambda line: None)
    print(f"MLP judge: test accuracy {accuracy(model, test):.4f}", flush=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def run(
    out: str, name: str, spec: str, steps: int, kappa: float, guard: float | None, seed: int, start: str = "grey"
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from geco_cla import load_classifier
    from geco_cla.network import DigitFeatures

    from geco_core.evaluation.realism import frechet_distances
    from geco_core.figures.run import save_grid
    from geco_core.training import Config, Run, build, evaluating, resume, train

    suffix = f"{'-guard' if guard else ''}{'-mean' if start == 'mean' else ''}{f'-seed{seed}' if seed else ''}"
    folder = Path(out) / f"{name}-{steps}{suffix}"
    cached = folder / "bench.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    config = tomllib.loads((REPO / "configs/mnist-geco-cla.toml").read_text())
    weights, *pairs = spec.split(",")
    options = {k: float(v) for k, v in (p.split("=") for p in pairs)}
    config["constraints"] = [{"name": "cla", "kappa": kappa, "weights": weights, **options}]
    if guard:
        config["constraints"].append({"name": "re", "kappa": guard})
    config["train"].update(steps=steps, threads=1, seed=seed)
    config["model"]["output_start"] = start
    config.setdefault("logging", {})["plots"] = False
    if (folder / "config.toml").is_file() and not (folder / "summary.json").is_file():
        resume(folder)  # an interrupted run continues
    elif not (folder / "summary.json").is_file():
        train(config=Config.from_dict(config), run_dir=folder, extra_callbacks=[])
    done = Run.open(folder)
    summary = done.read_summary()
    exp = build(done.config)
    exp.load_state_dict(done.load_checkpoint())
    split, data = exp.heldout
    batch = data.batch(torch.arange(EXAMPLES))
    torch.manual_seed(0)
    with evaluating(exp.model), torch.no_grad():
        recon = exp.forward(batch).x_hat
        samples = exp.model.sample(EXAMPLES)
    judges = {"standard": load_classifier("standard"), "standard twin": load_classifier("standard-twin")}
    judges["mlp"] = mlp_judge(Path(out))
    with torch.no_grad():
        acc = {k: float((j.eval()(recon).argmax(1) == batch.labels).float().mean()) for k, j in judges.items()}
        fd = frechet_distances(DigitFeatures(), [batch.x], reconstructions=[recon], samples=[samples])
    save_grid([batch.x[:16], recon[:16], samples[:16]], folder / "grid.png", ["data", "reconstruction", "sample"])
    cla = summary["constraints"][0]
    row = {
        "network": name,
        "weights": weights,
        "options": options,
        "steps": steps,
        "guard": guard,
        "seed": seed,
        "start": start,
        "kappa": kappa,
        "p_own": cla.heldout_reached,
        "status": cla.status,
        "judges": acc,
        "rmse": summary["heldout"]["rmse"],
        "kl": summary["heldout"]["kl"],
        "fd_reconstructions": fd["reconstructions"],
        "fd_samples": fd["samples"],
        "seconds": summary["seconds"],
    }
    cached.write_text(json.dumps(row, indent=1))
    return row


def network_facts(out: Path, weights: str) -> dict[str, str]:
    """The recipe and clean accuracy a weights file records, and its accuracy under a 40-step PGD
    attack at L-inf 0.3 on the first 1000 test digits (measured here, cached in ``OUT/facts.json``)."""
    import torch
    from geco_cla import load_classifier
    from geco_cla.network import SHIPPED
    from geco_cla.robust import robust_accuracy
    from safetensors import safe_open

    from geco_core import create

    cache = out / "facts.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if weights not in known:
        path = SHIPPED.get(weights, (Path(weights),))[0]
        with safe_open(str(path), "pt") as f:
            facts = dict(f.metadata() or {})
        torch.set_num_threads(1)
        test = create("dataset", "mnist", split="test", download=False)
        facts["pgd40_at_0.3"] = (
            f"{robust_accuracy(load_classifier(weights), test.images[:1000], test.labels[:1000], 0.3):.4f}"
        )
        known[weights] = facts
        cache.write_text(json.dumps(known, indent=1))
    return known[weights]


def table(out: Path, rows: list[dict[str, Any]]) -> str:
    lines = [
        "| network | recipe | options | clean | PGD-40 | start | steps | guard | κ | seed | p own | standard "
        "| standard twin | mlp | RMSE | KL | FD rec | FD smp |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        facts = network_facts(out, r["weights"])
        j = r["judges"]
        lines.append(
            f"| {r['network']} | {facts.get('recipe', 'standard')} {facts.get('eps', '')} | {_options(r)} | "
            f"{facts.get('test_accuracy', '-')} | {facts['pgd40_at_0.3']} | {r.get('start', 'grey')} | {r['steps']} | "
            f"{r['guard'] or '-'} | {r.get('kappa', 0.9):g} | {r.get('seed', 0)} | {r['p_own']:.3f} | "
            f"{j['standard']:.3f} | {j['standard twin']:.3f} | "
            f"{j['mlp']:.3f} | {r['rmse']:.3f} | {r['kl']:.1f} | {r['fd_reconstructions']:.1f} | "
            f"{r['fd_samples']:.1f} |"
        )
    return "\n".join(lines)


def _options(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in row.get("options", {}).items()) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cla")
    parser.add_argument("--network", action="append", default=[], help="NAME=WEIGHTS[,OPTION=VALUE...] (repeatable)")
    parser.add_argument("--steps", type=int, nargs="+", default=[3000])
    parser.add_argument("--kappa", type=float, default=0.9)
    parser.add_argument("--guard", type=float, nargs="*", default=[0.0], help="RE kappa stacked with CLA (0: alone)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--start", choices=("grey", "mean"), default="grey", help="the conv VAE's output_start")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only the table of every finished run in OUT")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table:
        rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/bench.json"))]
        rows.sort(key=lambda r: (r["guard"] or 0, r["steps"], r["network"]))
        text = table(out, rows)
        print(text)
        (out / "cla.md").write_text(text + "\n")
        return
    if not args.network:
        parser.error("give --network at least once (or --table)")
    out.mkdir(parents=True, exist_ok=True)
    mlp_judge(Path(args.out))
    jobs = [
        (args.out, *spec.split("=", 1), steps, args.kappa, guard or None, seed, args.start)
        for spec in args.network
        for steps in args.steps
        for guard in args.guard
        for seed in args.seeds
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, *zip(*jobs)))
    text = table(Path(args.out), rows)
    print(text)
    (Path(args.out) / "cla.md").write_text(text + "\n")
    (Path(args.out) / "cla.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
