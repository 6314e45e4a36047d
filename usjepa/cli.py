"""The `usjepa` command: one subcommand per stage of the flow."""

from __future__ import annotations

import argparse
import sys

from usjepa import __version__
from usjepa.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from usjepa import demo
    from usjepa.data import synth
    from usjepa.eval import cli as probe_cli
    from usjepa.ingest import cli as shards_cli
    from usjepa.train import cli as train_cli

    parser = argparse.ArgumentParser(
        prog="usjepa",
        description="US-JEPA: SALT pretraining of ultrasound foundation models "
                    "(frozen teacher -> student + predictor), shards, linear probes.")
    parser.add_argument("--version", action="version", version=f"usjepa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, synth, shards_cli, train_cli, probe_cli):
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after an option (`probe RUN --backbone x probe.seeds=[0]`):
    # accept trailing KEY=VALUE overrides wherever they stand.
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UserError as e:
        print(f"usjepa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"usjepa {args.command}: interrupted", file=sys.stderr)
        return 130
