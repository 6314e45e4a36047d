"""The `usjepa` command: one subcommand per stage of the flow.

Each subcommand lives in the module that does its work, which registers its own parser.
Only the module of the command being run is imported (torch and friends take seconds to
import), so `usjepa --help` answers at once; the one-line summaries below are what it lists.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from usjepa import __version__
from usjepa.errors import UserError

COMMANDS = {  # name: (module with register_cli, one-line summary)
    "demo": ("usjepa.demo", "the whole flow on synthetic ultrasound (6-12 minutes on 2 CPU cores)"),
    "synth": ("usjepa.data.synth", "generate a synthetic B-mode ultrasound image folder (the demo's data)"),
    "shards": ("usjepa.ingest.cli", "build, verify or inspect WebDataset shards of ultrasound corpora"),
    "train": ("usjepa.train.cli", "stage 1 (MAE teacher) or stage 2 (SALT student) training; resumes by itself"),
    "probe": ("usjepa.eval.cli", "linear and kNN probe macro-F1 of a run's encoders, an export or pixel baselines"),
    "bench": ("usjepa.bench.cli", "the UltraBench comparison: linear/kNN/few-shot/robustness macro-F1 of any encoders"),
    "study": ("usjepa.study.cli", "pretrain and probe every arm of a comparison (MAE, SALT, EMA, random) on real data"),
    "export": (
        "usjepa.export",
        "a run's encoder as timm weights (safetensors + config.json) for timm, probe or teacher",
    ),
}


class _SummaryAction(argparse._SubParsersAction):
    """Subparsers whose listing shows COMMANDS' summaries, whichever module registered them."""

    def add_parser(self, name, **kwargs):
        kwargs.setdefault("help", COMMANDS[name][1])
        return super().add_parser(name, **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the full parser of `command` (when given), stubs for the others."""
    parser = argparse.ArgumentParser(
        prog="usjepa",
        description="US-JEPA: SALT pretraining of ultrasound foundation models "
        "(frozen teacher -> student + predictor), shards, linear probes.",
    )
    parser.add_argument("--version", action="version", version=f"usjepa {__version__}")
    parser.register("action", "parsers", _SummaryAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, _) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).register_cli(sub)
        else:
            sub.add_parser(name, add_help=False)
    return parser


def _rank_tag() -> str:
    """` (rank N)` inside a distributed launch (torchrun's variables, also set under Slurm)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')})" if world.isdigit() and int(world) > 1 else ""


# What gloo and NCCL say in a collective whose peer process has gone.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def _lost_peer(e: BaseException) -> bool:
    return type(e).__name__ in ("DistBackendError", "DistNetworkError") or any(m in str(e) for m in _PEER_GONE)


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_of(argv))
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
        # One write per line: the ranks of a distributed run share a terminal.
        sys.stderr.write(f"usjepa {args.command}: error{_rank_tag()}: {e}\n")
        return 2
    except RuntimeError as e:
        if not (_rank_tag() and _lost_peer(e)):
            raise
        # Another rank ended first (its own one-line error is above): say so in one line too.
        first = str(e).strip().splitlines()[0][:160]
        sys.stderr.write(f"usjepa {args.command}: error{_rank_tag()}: lost contact with another rank ({first})\n")
        return 1
    except KeyboardInterrupt:
        print(f"usjepa {args.command}: interrupted", file=sys.stderr)
        return 130
