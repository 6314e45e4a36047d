"""`usjepa demo`: the whole flow on embedded synthetic data, on a CPU, in minutes.

synth images -> shards -> stage-1 MAE teacher -> SALT student -> linear probes of a random
encoder, the teacher and the student. Every stage resumes: rerunning an interrupted demo
with the same --out continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from usjepa.config import load_config
from usjepa.data.synth import GROUP_PATTERN, write_synthetic_dataset
from usjepa.errors import UserError
from usjepa.eval.cli import probe_backbone
from usjepa.eval.report import format_table
from usjepa.fileio import atomic_write_text
from usjepa.ingest.build.run import build_shards
from usjepa.ingest.settings import BuildSettings
from usjepa.train.loop import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BACKBONES = ("random", "teacher", "student")


def _config(name: str):
    path = CONFIGS / name
    if not path.is_file():
        raise UserError(
            f"{path} not found: the demo reads its configs from the source tree; "
            "install with `pip install -e .` from a checkout"
        )
    return path


def demo_shards(out: Path, images: int = 2000, progress: bool = True, say=lambda message: None) -> Path:
    """Stages 1-2: synthetic images in OUT/data, 64 px shards in OUT/shards (each skipped when
    done). Also the data of tools/bench_train.py."""
    data, shards = Path(out) / "data", Path(out) / "shards"
    say(f"[1/5] synthetic B-mode images -> {data}")
    if not data.is_dir():  # written aside and renamed, so an interrupted run never leaves half a set
        partial = Path(out) / "data.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_synthetic_dataset(partial, n=images, size=128, seed=0)
        partial.rename(data)
    say(f"[2/5] shards -> {shards}")
    if not (shards / "manifest.json").is_file():
        build_shards(
            data, shards, BuildSettings(image_size=64, shard_size=100, group_pattern=GROUP_PATTERN), progress=progress
        )
    return shards


def run_demo(
    out: Path,
    images: int = 2000,
    steps: int | None = None,
    seeds: int | None = None,
    progress: bool = True,
    overrides: tuple[str, ...] = (),
) -> dict:
    """The five stages; `overrides` (KEY=VALUE) apply to both training stages' configs."""
    start = time.perf_counter()
    out = Path(out)
    shards = out / "shards"
    teacher_dir, student_dir = out / "runs" / "teacher", out / "runs" / "student"

    demo_shards(out, images, progress, say=print)
    common = [f"data.shards={shards}", f"log.progress={str(progress).lower()}", *overrides]
    if steps:
        common += [
            f"train.total_steps={steps}",
            f"optim.warmup_steps={max(steps // 10, 1)}",
            f"checkpoint.every_steps={steps}",
        ]
    print(f"[3/5] stage 1: MAE teacher -> {teacher_dir}")
    train(load_config(_config("demo_teacher.yaml"), [f"run.dir={teacher_dir}", *common]))
    print(f"[4/5] stage 2: SALT student against the frozen teacher -> {student_dir}")
    train(load_config(_config("demo.yaml"), [f"run.dir={student_dir}", f"teacher.checkpoint={teacher_dir}", *common]))
    print(f"[5/5] linear probes ({', '.join(BACKBONES)})")
    probe_overrides = [f"probe.seeds={list(range(seeds))}"] if seeds else []
    results = {
        kind: probe_backbone(student_dir, kind, out_dir=out / "probe", overrides=probe_overrides, progress=progress)
        for kind in BACKBONES
    }
    summary = {"minutes": (time.perf_counter() - start) / 60, "backbones": results}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(format_table(results))
    print(f"demo finished in {summary['minutes']:.1f} min; summary: {out / 'summary.json'}")
    print(f"TensorBoard: tensorboard --logdir {out / 'runs'}")
    return summary


def _run(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), images=args.images, steps=args.steps, seeds=args.seeds, overrides=tuple(args.overrides))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        description="synth -> shards -> stage-1 MAE teacher -> SALT student -> linear probes of a "
        "random encoder, the teacher and the student. Writes OUT/summary.json and prints "
        "a macro-F1 table. Rerun with the same --out to resume an interrupted demo.",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--images", type=int, default=2000, help="synthetic images to generate (default: 2000)")
    p.add_argument("--steps", type=int, help="training steps per stage (default: the configs' total_steps)")
    p.add_argument("--seeds", type=int, help="probe seeds (default: the config's 5)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of both training configs, e.g. predictor.layout=per_block",
    )
    p.set_defaults(func=_run)
