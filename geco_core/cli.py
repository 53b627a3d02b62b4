"""The ``geco`` command line. Every user error ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from geco_core.errors import GecoError
from geco_core.plugins import HOOKS, registry

__all__ = ["main"]


def _list(kind: str) -> int:
    reg = registry()
    entries = sorted(reg.entries[kind].values(), key=lambda e: e.name)
    rows = [("name", "distribution", "version", "description")]
    rows += [(e.name, e.distribution, e.version, e.description) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    if not entries:
        print(f"(no {kind}s installed)")
    for f in reg.failures:
        print(f"broken plugin {f.plugin!r} ({f.distribution}): {f.error}", file=sys.stderr)
    return 0


def _print_summary(run_dir) -> int:
    import json
    from pathlib import Path

    from geco_core.summary import format_summary

    print(format_summary(json.loads((Path(run_dir) / "summary.json").read_text())))
    return 0


def _train(args: argparse.Namespace) -> int:
    from geco_core.training import train

    return _print_summary(train(args.config, overrides=args.set, run_dir=args.run_dir))


def _resume(args: argparse.Namespace) -> int:
    from geco_core.training import resume

    return _print_summary(resume(args.run_dir, steps=args.steps))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geco", description="Train VAEs with GECO: constraints in data space, KL minimised."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for kind in HOOKS:
        p = sub.add_parser(f"{kind}s", help=f"list the installed {kind}s and where they come from")
        p.set_defaults(run=lambda args, kind=kind: _list(kind))

    p = sub.add_parser("train", help="train from a TOML config into a new run folder")
    p.add_argument("config", help="a TOML config, e.g. configs/quickstart.toml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax), e.g. --set train.steps=200 --set constraints.0.kappa=0.08",
    )
    p.add_argument("--run-dir", help="the run folder (default: logging.dir/<name>-<time>)")
    p.set_defaults(run=_train)

    p = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    p.add_argument("run_dir", help="a run folder written by geco train")
    p.add_argument("--steps", type=int, help="train to this total number of steps (default: train.steps)")
    p.set_defaults(run=_resume)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except GecoError as exc:
        print(f"geco: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("geco: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
