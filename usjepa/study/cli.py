"""`usjepa study SPEC [key=value ...]`: shard sets -> every arm trained on every seed ->
probes on every task -> results.json, table.md and the printed table. Rerun to resume."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from usjepa.study.jobs import run_jobs
from usjepa.study.plan import Paths, build_shard_sets, plan_jobs
from usjepa.study.report import write_report
from usjepa.study.spec import load_study


def run_study(spec_path: str, overrides: list[str], progress: bool = True, dry_run: bool = False) -> str:
    spec = load_study(spec_path, overrides)
    paths = Paths(Path(spec.out).resolve())
    start = time.perf_counter()
    jobs = plan_jobs(spec, paths)
    if dry_run:
        return "\n".join(f"{j.key}: usjepa {' '.join(j.args)}" for j in jobs)
    build_shard_sets(spec, paths)
    run_jobs(jobs, paths.out, spec.jobs, progress)
    text = write_report(spec, paths)
    return (
        f"{text}\nstudy finished in {(time.perf_counter() - start) / 60:.1f} min (this invocation); "
        f"{paths.out / 'table.md'}, {paths.out / 'results.json'}"
    )


def _run(args: argparse.Namespace) -> int:
    print(run_study(args.spec, args.overrides, dry_run=args.dry_run))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "study",
        description="Pretrain every arm of SPEC (e.g. configs/study_real.yaml) on the same shard sets, "
        "steps and seeds, probe each (linear, 5 seeds, and kNN) on the labelled tasks, and write "
        "OUT/table.md and OUT/results.json (macro-F1, balanced accuracy, GFLOPs and wall time per arm). "
        "Jobs run as separate processes, `jobs` at a time; rerun the same command to resume.",
    )
    p.add_argument("spec", help="study spec (YAML), e.g. configs/study_real.yaml")
    p.add_argument("--dry-run", action="store_true", help="list the jobs (usjepa commands) and run nothing")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides of the spec, e.g. out=/tmp/study seeds=[0] steps=100",
    )
    p.set_defaults(func=_run)
