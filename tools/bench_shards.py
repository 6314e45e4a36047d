"""Shard-builder throughput on real images (default: BUSI, 780 PNGs, 256 px output).

    python tools/bench_shards.py [--src DIR] [--size 256] [--workers 1,2] [--stages 200]

For each worker count: a fresh `run_build` into a temporary folder; prints images/s of the
processing phase (wall clock), overall (listing + processing + packing), per worker, and
per CPU-second (CPU time of this process and its workers: the per-core rate, which does not
depend on what else the machine is running). `--stages N` first times each step of the
per-image work on N images in this process. The goal on a modern core is >= 200 images/s
per core at 256 px.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from usjepa.ingest.build.item import process_item  # noqa: E402
from usjepa.ingest.build.run import run_build  # noqa: E402
from usjepa.ingest.build.workdir import write_result  # noqa: E402
from usjepa.ingest.image.overlay import to_gray  # noqa: E402
from usjepa.ingest.image.preprocess import preprocess  # noqa: E402
from usjepa.ingest.settings import BuildSettings  # noqa: E402
from usjepa.ingest.sources import open_source  # noqa: E402
from usjepa.ingest.sources.detect import detect_format  # noqa: E402
from usjepa.shardset import sample as sample_format  # noqa: E402

DEFAULT_SRC = ROOT.parent / "shared" / "data" / "busi" / "Dataset_BUSI_with_GT"


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers, once joined
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def stages(src: Path, settings: BuildSettings, n: int) -> None:
    items = list(open_source(detect_format(src), src))[:n]
    item_settings = settings.item_settings()
    pp = item_settings.preprocess
    t = dict.fromkeys(("load", "colour", "preprocess", "encode", "item (all)", "write result"), 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for i, item in enumerate(items):
            t0 = time.perf_counter()
            loaded = item.load()
            t1 = time.perf_counter()
            gray, _ = to_gray(loaded.image, item_settings.overlay)
            t2 = time.perf_counter()
            out = preprocess(gray, pp, loaded.region)
            t3 = time.perf_counter()
            sample_format.pixel_hash(out.image)
            sample_format.encode_pixels(out.image, out.region)
            t4 = time.perf_counter()
            header, payload = process_item(item, item_settings)
            t5 = time.perf_counter()
            write_result(Path(tmp) / f"{i}.res", header, payload)
            t6 = time.perf_counter()
            for name, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                t[name] += dt
    print(f"per-image stages, {len(items)} images, one process (ms/image):")
    for name, total in t.items():
        print(f"  {name:13s} {1000 * total / len(items):6.2f}")
    print(f"  -> {len(items) / (t['item (all)'] + t['write result']):.0f} images/s per core for the per-item work")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="source folder (default: shared BUSI)")
    parser.add_argument("--size", type=int, default=256, help="output image side")
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts")
    parser.add_argument("--stages", type=int, default=200, help="images for the per-stage timing (0: skip)")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        print(f"bench_shards: source {args.src} not found (the BUSI image folders); pass --src", file=sys.stderr)
        return 2
    settings = BuildSettings(image_size=args.size, shard_size=1000)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"source {args.src}, {args.size} px output, {os.cpu_count()} CPUs, load average {load:.2f} at start")
    if args.stages:
        stages(args.src, settings, args.stages)
    for workers in [int(w) for w in args.workers.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            cpu0, wall0 = cpu_seconds(), time.perf_counter()
            result = run_build(args.src, Path(tmp) / "out", settings, progress=False, workers=workers)
            wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
        run, frames = result.report["run"], result.report["summary"]["frames"]
        process = run["seconds"]["process"]
        print(
            f"workers {workers}: {frames} images; processing {process:.2f} s = {frames / process:.0f} images/s "
            f"({frames / process / workers:.0f} per worker); whole build {wall:.2f} s = {frames / wall:.0f} images/s "
            f"(pack {run['seconds']['pack']:.2f} s); {frames / cpu:.0f} images per CPU-second"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
