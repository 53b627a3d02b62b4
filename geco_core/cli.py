"""The ``geco`` command line. Every user error ends in one line on stderr and exit code 2; a run
that diverges prints its summary, then one line, and exits with 3."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
from collections.abc import Sequence

from geco_core import __version__
from geco_core.errors import ConfigError, GecoError
from geco_core.plugins import HOOKS, registry

__all__ = ["main"]

#: what the ``train`` extra installs, by import name (the commands that train, evaluate or plot need it)
TRAIN_EXTRA = (
    "filelock",
    "tqdm",
    "matplotlib",
    "tensorboard",
    "tomli_w",
    "safetensors",
    "numpy",
    "torchmetrics",
    "PIL",
)
EXIT_DIVERGED = 3


def _list(kind: str) -> int:
    reg = registry()
    entries = sorted(reg.entries[kind].values(), key=lambda e: e.name)
    rows = [("name", "distribution", "version", "description")]
    rows += [(e.name, e.distribution, e.version, e.description) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    if not entries:
        print(f"(no {kind if kind.endswith('s') else kind + 's'} installed)")
    for failure in reg.failures:
        print(f"broken {failure}", file=sys.stderr)
    return 0


def _require_train_extra(command: str) -> None:
    """One line naming the extra (and what is missing) before anything is created."""
    missing = [m for m in TRAIN_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"geco {command} needs the train extra: pip install 'geco-core[train]' (missing: {', '.join(missing)})"
        )


def _print_summary(run_dir, output: str = "table") -> int:
    from geco_core.training import Run, strict_json
    from geco_core.training.summary import format_summary

    summary = Run.open(run_dir).read_summary()
    if output == "quiet":
        print(Run.open(run_dir).path)
    elif summary is not None:
        print(strict_json(summary) if output == "json" else format_summary(summary))
    return 0


def _output(args: argparse.Namespace) -> str:
    return "json" if args.json else "quiet" if args.quiet else "table"


def _callbacks(config, output: str):
    """The default callbacks for ``output``: without the progress bar for ``quiet`` and ``json``,
    with the records as JSON lines on stdout for ``json``; None (the defaults) for ``table``."""
    from geco_core.training import default_callbacks
    from geco_core.training.callbacks import JsonLines, ProgressBar

    if output == "table":
        return None
    chosen = [c for c in default_callbacks(config) if not isinstance(c, ProgressBar)]
    return chosen + [JsonLines()] if output == "json" else chosen


def _training(action, output: str) -> int:
    """Run ``action`` (train or resume) and print the summary (a table, one JSON object, or the
    run folder for ``quiet``); a diverged run exits with 3. Under torchrun only the first process
    prints."""
    from geco_core.training import RunDiverged
    from geco_core.training.distributed import launched

    first = launched().main
    try:
        run_dir = action()
    except RunDiverged as exc:
        if first:
            _print_summary(exc.run_dir, output)
            print(f"geco: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    return _print_summary(run_dir, output) if first else 0


def _train(args: argparse.Namespace) -> int:
    _require_train_extra("train")
    from geco_core.evaluation.kappa import below_floor
    from geco_core.training import load_config, train
    from geco_core.training.distributed import launched

    config = load_config(args.config, args.set)
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    if launched().main:
        for line in below_floor(config):
            print(f"geco: warning: {line}", file=sys.stderr)
    output = _output(args)
    callbacks = _callbacks(config, output)
    return _training(lambda: train(args.config, config=config, run_dir=args.run_dir, callbacks=callbacks), output)


def _find_kappa(args: argparse.Namespace) -> int:
    _require_train_extra("find-kappa")
    from geco_core.evaluation.kappa import find_kappa, format_result

    result = find_kappa(args.config, overrides=args.set, steps=args.steps, run_dir=args.run_dir)
    print(format_result(result))
    print(f"written: {result.folder}/kappa.json, kappa.md, kappa.png")
    return 0


def _resume(args: argparse.Namespace) -> int:
    _require_train_extra("resume")
    from geco_core.training import Run, resume

    output = _output(args)
    callbacks = _callbacks(Run.open(args.run_dir).config, output)
    return _training(lambda: resume(args.run_dir, steps=args.steps, callbacks=callbacks), output)


def _eval(args: argparse.Namespace) -> int:
    _require_train_extra("eval")
    from geco_core.evaluation import evaluate_run, format_report

    report = evaluate_run(
        args.run_dir,
        examples=args.examples,
        sigma_examples=args.sigma_examples,
        marginal_examples=args.marginal_examples,
        samples_per_example=args.samples,
        seed=args.seed,
        realism_examples=args.realism_examples,
    )
    print(format_report(report))
    print(f"report: {args.run_dir}/eval.json")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    _require_train_extra("sweep")
    from geco_core.evaluation import sweep, table

    options = {
        "examples": args.examples,
        "marginal_examples": args.marginal_examples,
        "seed": args.seed,
        "realism_examples": args.realism_examples,
    }
    points = sweep(
        args.configs, args.out, args.kappa, args.objectives, args.set, options,
        jobs=args.jobs, backend=args.backend, ray_address=args.ray_address,
    )  # fmt: skip
    print(table(points))
    print(f"written: {args.out}/sweep.json, sweep.md, information_plane.png, grids-<config>.png")
    return 0


def _plot(args: argparse.Namespace) -> int:
    _require_train_extra("plot")
    from pathlib import Path

    from geco_core.evaluation import plot_curves
    from geco_core.training import Run

    runs = []
    for path in args.run_dirs:
        run = Run.open(path)
        records = run.read_metrics()
        if not records:
            raise ConfigError(f"{run.path} has no metrics.jsonl to plot")
        rows = (run.read_summary() or {"constraints": []})["constraints"]
        kappa = rows[0].kappa if rows and rows[0].enforced else None  # a kappa the run enforced
        runs.append((f"{run.path.parent.name}/{run.path.name}", records, kappa))
    print(plot_curves(runs, Path(args.out)))
    return 0


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax), e.g. --set train.steps=2000 --set constraints.0.kappa=0.08",
    )


def _add_output(p: argparse.ArgumentParser) -> None:
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="no progress; print only the run folder at the end")
    shown.add_argument("--json", action="store_true", help="a JSON object per logged step, then the summary, on stdout")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--examples", type=int, default=10_000, help="held-out examples for NLL/RMSE, train ones for KL")
    p.add_argument(
        "--marginal-examples",
        type=int,
        help="n of the marginal KL (default by posterior: 10000 Gaussian, 1000 flow, 200 ConvDraw)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and posterior draws")
    p.add_argument(
        "--realism-examples",
        type=int,
        default=5000,
        help="held-out images (and prior samples) of the Fréchet distances (default: %(default)s)",
    )


class _ShowDefaults(argparse.HelpFormatter):
    """Help that ends each option with its default, where it has one worth saying (not None,
    False or empty) and the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        worth = not (default is None or default is False or default == [] or default == argparse.SUPPRESS)
        shown = worth and "default" not in text
        return f"{text} (default: %(default)s)" if shown and action.option_strings else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geco", description="Train VAEs with GECO: constraints in data space, KL minimised."
    )
    parser.add_argument("--version", action="version", version=f"geco {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=_ShowDefaults)
    for kind in HOOKS:
        kinds = kind if kind.endswith("s") else f"{kind}s"  # features: feature networks
        p = sub.add_parser(kinds, help=f"list the installed {kinds} and where they come from")
        p.set_defaults(run=lambda args, kind=kind: _list(kind))

    p = sub.add_parser("train", help="train from a TOML config into a new run folder")
    p.add_argument("config", help="a TOML config, e.g. configs/quickstart.toml")
    _add_set(p)
    p.add_argument("--run-dir", help="the run folder (default: logging.dir/<name>-<time>)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (the --set overrides applied, every default written out) as TOML and exit",
    )
    _add_output(p)
    p.set_defaults(run=_train)

    p = sub.add_parser(
        "find-kappa", help="one short run with a lambda ramp: reachable kappa, its cost in KL, a suggestion"
    )
    p.add_argument("config", help="a TOML config with a GECO objective, e.g. configs/mnist-geco-re.toml")
    _add_set(p)
    p.add_argument(
        "--steps",
        type=int,
        help="the finder's length (default: train.steps up to 2000 steps; above 5000, train.steps / 2.5, so that "
        "its floor reaches the budget)",
    )
    p.add_argument("--run-dir", help="its folder (default: logging.dir/kappa-<name>-<time>)")
    p.set_defaults(run=_find_kappa)

    p = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    p.add_argument("run_dir", help="a run folder written by geco train")
    p.add_argument("--steps", type=int, help="train to this total number of steps (default: train.steps)")
    _add_output(p)
    p.set_defaults(run=_resume)

    p = sub.add_parser("eval", help="sigma_opt, quantised-normal NLL, RMSE vs kappa, average and marginal KL")
    p.add_argument("run_dir", help="a run folder written by geco train")
    _add_eval_options(p)
    p.add_argument("--sigma-examples", type=int, default=1000, help="train examples for sigma_opt (paper: 1000)")
    p.add_argument("--samples", type=int, default=1, help="posterior draws per example for the marginal KL")
    p.set_defaults(run=_eval)

    p = sub.add_parser("sweep", help="train configs over kappa values and objectives, then evaluate and plot")
    p.add_argument("configs", nargs="+", help="TOML configs; kappa applies to each one's first constraint")
    p.add_argument("--kappa", type=float, nargs="+", default=[], help="kappa values for the constrained runs")
    p.add_argument("--objectives", nargs="+", default=["geco"], help="registered objectives (default: geco)")
    p.add_argument("--out", default="runs/sweep", help="the sweep folder (default: runs/sweep); reruns resume it")
    p.add_argument("--jobs", type=int, help="runs at once (default: one per free core)")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="processes here, or Ray tasks")
    p.add_argument("--ray-address", help="a Ray cluster (default: $RAY_ADDRESS, else a local one)")
    _add_set(p)
    _add_eval_options(p)
    p.set_defaults(run=_sweep)

    p = sub.add_parser("plot", help="KL and RMSE against the iteration for several runs (the paper's Figure 4)")
    p.add_argument("run_dirs", nargs="+", help="run folders written by geco train")
    p.add_argument("--out", default="curves.png", help="the image to write (default: curves.png)")
    p.set_defaults(run=_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said with the usage of the command they were given to
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code = args.run(args)
    except GecoError as exc:
        print(f"geco: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("geco: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # the reader of stdout went away (`geco train --json | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("geco: stopped: nothing reads the output any more", file=sys.stderr)
        code = 141
    # torchrun's environment read here: the training layer (launched()) needs the train extra, whose absence is an error
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command in ("train", "resume"):
        from geco_core.training.distributed import exit_process

        exit_process(code)  # a process of a torchrun run: no interpreter finalisation (see there)
    return code


if __name__ == "__main__":
    sys.exit(main())
