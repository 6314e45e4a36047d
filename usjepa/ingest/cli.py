"""`usjepa shards build SRC OUT` and `usjepa shards verify OUT`."""

from __future__ import annotations

import argparse

from usjepa.ingest.manifest import Manifest
from usjepa.ingest.sources import SOURCES
from usjepa.ingest.verify import verify_shards
from usjepa.ingest.writer import BuildSettings, timed_build

_DEFAULTS = BuildSettings()


def register_cli(subparsers) -> None:
    """Add `shards` (with `build` and `verify`) to the `usjepa` command's subparsers."""
    shards = subparsers.add_parser(
        "shards",
        help="build or verify WebDataset shards of preprocessed ultrasound images",
        description="Turn an image folder into WebDataset tar shards (grayscale, ultrasound-region "
        "mask, crop, percentile stretch, group-disjoint train/val/test splits) and check them.",
    )
    shards.set_defaults(func=lambda args: _print_help(shards))
    sub = shards.add_subparsers(dest="shards_command", metavar="{build,verify}")

    build = sub.add_parser(
        "build",
        help="preprocess an image folder into shards",
        description="SRC/<class>/<image> -> OUT/{train,val,test}-NNNNNN.tar + OUT/manifest.json. "
        "Class folder names (sorted) give the labels; unreadable images are skipped and listed in "
        "the manifest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    build.add_argument("src", metavar="SRC", help="source folder, one subfolder per class")
    build.add_argument("out", metavar="OUT", help="output folder for the shards and manifest.json")
    build.add_argument("--size", type=int, default=_DEFAULTS.image_size, help="output image side in pixels (square)")
    build.add_argument("--shard-size", type=int, default=_DEFAULTS.shard_size, help="at most this many samples per tar")
    build.add_argument("--val-fraction", type=float, default=_DEFAULTS.val_fraction, help="share of images for validation")
    build.add_argument("--test-fraction", type=float, default=_DEFAULTS.test_fraction, help="share of images for test")
    build.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed of the split and of the sample order")
    build.add_argument(
        "--group-pattern",
        default=None,
        help="regex; its first capture group, searched in each file name (without extension), is the "
        "patient/video id that splits keep together, e.g. 'patient_(\\d+)'. Default: each image is its own group",
    )
    build.add_argument(
        "--exclude-pattern",
        default=_DEFAULTS.exclude_pattern,
        help="regex; files whose name (without extension) matches are skipped, e.g. segmentation "
        "masks; '' to include everything",
    )
    build.add_argument("--format", default=_DEFAULTS.format, choices=sorted(SOURCES), help="source layout")
    build.add_argument("--overwrite", action="store_true", help="replace an existing shard set in OUT")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)

    verify = sub.add_parser(
        "verify",
        help="decode every sample and check it against the manifest",
        description="Check sha256, counts, labels, image size and region masks of a shard set.",
    )
    verify.add_argument("out", metavar="OUT", help="folder holding manifest.json and the shards")
    verify.set_defaults(func=_verify)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _build(args) -> int:
    settings = BuildSettings(
        image_size=args.size,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        group_pattern=args.group_pattern,
        exclude_pattern=args.exclude_pattern or None,
        overwrite=args.overwrite,
        format=args.format,
    )
    manifest, seconds = timed_build(args.src, args.out, settings, progress=not args.no_progress)
    processed = manifest.total + len(manifest.skipped)
    print(f"built {manifest.total} samples into {manifest.root} ({manifest.image_size} px)")
    print(summarize(manifest))
    print(f"skipped {len(manifest.skipped)}", end="")
    for s in manifest.skipped[:5]:
        print(f"\n  {s['source']}: {s['reason']}", end="")
    if len(manifest.skipped) > 5:
        print(f"\n  ... (all listed in {manifest.root / 'manifest.json'})", end="")
    print()
    print(f"{seconds:.1f} s, {processed / max(seconds, 1e-9):.0f} images/s")
    return 0


def summarize(manifest: Manifest) -> str:
    lines = [f"classes: {', '.join(f'{i}={c}' for i, c in enumerate(manifest.classes))}"]
    for split, info in manifest.splits.items():
        per_class = ", ".join(f"{c} {n}" for c, n in info.class_counts.items())
        lines.append(f"{split:5s} {info.count:7d} samples, {info.groups} groups, {len(info.shards)} shard(s) ({per_class})")
    return "\n".join(lines)


def _verify(args) -> int:
    report = verify_shards(args.out)
    print(f"ok: {report['samples']} samples in {report['shards_dir']} verified in {report['seconds']:.1f} s")
    for split, r in report["splits"].items():
        print(f"{split:5s} {r['count']:7d} samples, {r['shards']} shard(s), {r['groups']} groups")
    if report["unlisted_shards"]:
        print(f"note: {len(report['unlisted_shards'])} shard file(s) not in the manifest (ignored): {report['unlisted_shards'][:5]}")
    return 0
