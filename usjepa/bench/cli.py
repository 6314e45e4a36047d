"""`usjepa bench SPEC [key=value ...]`: every backbone of SPEC probed on every dataset of
SPEC (linear and kNN; few-shot and robustness when enabled) -> OUT/results.json, table.md,
table.csv and plots. Rerun the same command to resume: finished cells and features are kept."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from usjepa.bench.report import format_summary
from usjepa.bench.run import RESULTS, run_bench
from usjepa.bench.spec import load_bench


def _run(args: argparse.Namespace) -> int:
    spec = load_bench(args.spec, args.overrides)
    start = time.perf_counter()
    doc = run_bench(spec, progress=not args.no_progress)
    out = Path(spec.out)
    print(format_summary(doc["results"]))
    print(
        f"bench finished in {(time.perf_counter() - start) / 60:.1f} min: {out / RESULTS}, {out / 'table.md'}, "
        f"{out / 'table.csv'}" + (f", {out / 'plots'}/" if spec.plots else "")
    )
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        description="Benchmark frozen encoders as the US-JEPA paper does: for every backbone of SPEC "
        "(this project's runs and exports, random inits, timm / open_clip / MAE / BEiT checkpoint "
        "files) on every labelled shard set of SPEC, a linear probe (5 seeds, macro-F1) and a kNN "
        "probe, video-level scores where frames share a video, and few-shot and robustness curves "
        "when enabled. Features are cached per (weights, shard set, preprocessing); rerun to resume.",
    )
    p.add_argument("spec", help="bench spec (YAML), e.g. configs/bench_ultrabench.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides of the spec, e.g. out=/tmp/bench probe.seeds=[0,1] fewshot.enabled=true",
    )
    p.set_defaults(func=_run)
