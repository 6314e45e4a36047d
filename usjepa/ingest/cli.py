"""`usjepa shards build SRC OUT`, `usjepa shards verify OUT`, `usjepa shards inspect OUT`."""

from __future__ import annotations

import argparse
from dataclasses import replace

from usjepa.config import parse_override
from usjepa.errors import UserError
from usjepa.ingest.build.run import run_build
from usjepa.ingest.build.workdir import WORK_DIR
from usjepa.ingest.build.workers import resolve_workers
from usjepa.ingest.image.overlay import LARGE_OVERLAY_ACTIONS
from usjepa.ingest.image.preprocess import RESIZE_MODES
from usjepa.ingest.inspect import contact_sheet, contents_lines, summary_lines
from usjepa.ingest.recipes import load_recipe, parse_assignments
from usjepa.ingest.settings import BuildSettings
from usjepa.ingest.sources import SOURCES
from usjepa.ingest.sources.base import describe_options
from usjepa.ingest.sources.detect import AUTO, format_choices
from usjepa.ingest.verify import verify_shards
from usjepa.shardset.manifest import REPORT_NAME, load_manifest

_DEFAULTS = BuildSettings()

# CLI flag (argparse dest) -> BuildSettings field; each flag defaults to None ("not given"),
# so a recipe's settings hold unless the flag is given explicitly.
_SETTING_FLAGS = {
    "size": "image_size",
    "resize_mode": "resize_mode",
    "shard_size": "shard_size",
    "val_fraction": "val_fraction",
    "test_fraction": "test_fraction",
    "seed": "seed",
    "group_pattern": "group_pattern",
    "exclude_pattern": "exclude_pattern",
    "format": "format",
    "max_samples": "max_samples",
    "weight_cap": "weight_cap",
    "large_overlay": "large_overlay",
    "dedup": "dedup",
}
_OVERLAY_FLAGS = {"overlay_max_fraction": "max_fraction", "overlay_tolerance": "tolerance"}


def register_cli(subparsers) -> None:
    """Add `shards` (with `build`, `verify` and `inspect`) to the `usjepa` command's subparsers."""
    shards = subparsers.add_parser(
        "shards",
        description="Turn a source (image folder, ...) into WebDataset tar shards (grayscale with colour "
        "overlays inpainted or flagged, ultrasound-region mask, crop, percentile stretch, dedup, "
        "group-disjoint train/val/test splits) and check or look at them.",
    )
    shards.set_defaults(func=lambda args: _print_help(shards))
    sub = shards.add_subparsers(dest="shards_command", metavar="{build,verify,inspect}")
    _add_build(sub)
    _add_verify(sub)
    _add_inspect(sub)


def _add_build(sub) -> None:
    formats = "; ".join(f"{name}: {describe_options(cls)}" for name, cls in sorted(SOURCES.items()))
    build = sub.add_parser(
        "build",
        epilog=f"Source formats and their options (--source-option KEY=VALUE, a recipe's options): {formats}.",
        help="preprocess a source into shards",
        description="SRC -> OUT/{train,val,test}-NNNNNN.tar + OUT/build_report.json + OUT/manifest.json "
        "(written last). Work is done per item into OUT/.work (parallel with --workers): an "
        "interrupted build (Ctrl-C, kill) resumes where it stopped when the same command is run "
        "again. Unreadable inputs are skipped and listed in the build report. With --recipe, SRC "
        "and the settings come from the recipe; flags given explicitly override it.",
    )
    build.add_argument(
        "src", metavar="SRC", nargs="?", default=None, help="source folder (optional with --recipe, which names it)"
    )
    build.add_argument("out", metavar="OUT", help="output folder for the shards, build_report.json and manifest.json")
    d = _DEFAULTS
    build.add_argument(
        "--format",
        default=None,
        choices=format_choices(),
        help=f"source layout; '{AUTO}' asks every format whether it recognises SRC (default: {d.format})",
    )
    build.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that load, preprocess and encode (0: one per CPU core); the output "
        "does not depend on it (default: 1)",
    )
    build.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"output size in pixels: the side of the square, or the shorter side with "
        f"--resize-mode short_side (default: {d.image_size})",
    )
    build.add_argument(
        "--resize-mode",
        default=None,
        choices=RESIZE_MODES,
        help="pad: pad the region crop to a square, then resize (keeps the aspect ratio); "
        "stretch: resize the crop to a square; short_side: shorter side to --size, aspect "
        f"kept, not square (default: {d.resize_mode})",
    )
    build.add_argument("--shard-size", type=int, help=f"at most this many samples per tar (default: {d.shard_size})")
    build.add_argument("--val-fraction", type=float, help=f"share of samples for val (default: {d.val_fraction})")
    build.add_argument("--test-fraction", type=float, help=f"share of samples for test (default: {d.test_fraction})")
    build.add_argument(
        "--seed",
        type=int,
        help=f"seed of the splits, the sample order and the --max-samples choice (default: {d.seed})",
    )
    build.add_argument(
        "--group-pattern",
        default=None,
        help="regex; its first capture group, searched in each file name (without extension), is the "
        "patient/video id that splits keep together, e.g. 'patient_(\\d+)'. Default: each image is its own group",
    )
    build.add_argument(
        "--exclude-pattern",
        default=None,
        help="regex; files whose name (without extension) matches are skipped, e.g. segmentation "
        f"masks; '' to include everything (default: '{d.exclude_pattern}')",
    )
    build.add_argument(
        "--source-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of the source format, repeatable, e.g. fps=3, max_frames=30, "
        "group_by=patient; the formats' options are listed below (VALUE is read as YAML: numbers, "
        "true/false, null, lists)",
    )
    _add_selection_and_output_flags(build)


def _add_selection_and_output_flags(build) -> None:
    d = _DEFAULTS
    build.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="keep at most this many samples (deterministic: the first ones in a seeded order of "
        "the items, after failures and duplicates; default: all)",
    )
    build.add_argument(
        "--weight-cap",
        type=int,
        default=None,
        help=f"manifest sampling_weight = min(train samples, this) for dataset mixing (default: {d.weight_cap})",
    )
    build.add_argument(
        "--overlay-max-fraction",
        type=float,
        default=None,
        help="colour overlays covering less than this share of an image are inpainted, larger ones "
        f"flagged (default: {d.overlay.max_fraction})",
    )
    build.add_argument(
        "--overlay-tolerance",
        type=int,
        default=None,
        help=f"a pixel is coloured when its channels differ by more than this (default: {d.overlay.tolerance})",
    )
    build.add_argument(
        "--large-overlay",
        choices=LARGE_OVERLAY_ACTIONS,
        default=None,
        help=f"images with large colour overlays: keep and flag them, or skip them (default: {d.large_overlay})",
    )
    build.add_argument(
        "--no-dedup",
        dest="dedup",
        action="store_const",
        const=False,
        default=None,
        help="keep identical images (default: each distinct preprocessed image is written once)",
    )
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing shard set in OUT (and unfinished work made with other settings)",
    )
    build.add_argument(
        "--keep-work",
        action="store_true",
        help=f"keep OUT/{WORK_DIR} after the build: a later --overwrite build with the same "
        "preprocessing then only re-splits and re-packs",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.add_argument("--recipe", metavar="PATH", default=None, help="build recipe (YAML): source, format, settings")
    build.add_argument(
        "--set",
        dest="variables",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe variable ${NAME}, repeatable (e.g. --set BUSI=/data/busi)",
    )
    build.set_defaults(func=_build)


def _add_verify(sub) -> None:
    verify = sub.add_parser(
        "verify",
        help="decode every sample and check it against the manifest",
        description="Check sha256, counts, labels, image size, region masks, build fields (overlay flags, "
        "pixel hashes: no duplicates when deduplicated) and the sampling weight of a shard set.",
    )
    verify.add_argument("out", metavar="OUT", help="folder holding manifest.json and the shards")
    verify.set_defaults(func=_verify)


def _add_inspect(sub) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="summarise a shard set; draw a contact sheet of samples with their region masks",
        description="Print what the shard set holds; with --grid, also write a PNG of the first N samples "
        "of a split with the region mask drawn on each (green border, blue outside) and its class.",
    )
    inspect.add_argument("out", metavar="OUT", help="folder holding manifest.json and the shards")
    inspect.add_argument("--grid", metavar="PNG", default=None, help="write the contact sheet to this PNG file")
    inspect.add_argument("--split", default="train", help="split to draw from (default: train)")
    inspect.add_argument("--n", type=int, default=32, help="samples to draw, the first of the split (default: 32)")
    inspect.add_argument("--columns", type=int, default=None, help="tiles per row (default: about sqrt(n))")
    inspect.set_defaults(func=_inspect)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def settings_from_args(args, base: BuildSettings | None = None) -> BuildSettings:
    """BuildSettings from `base` (defaults or a recipe's) and the flags given explicitly."""
    base = base or BuildSettings()
    given = {
        field: getattr(args, dest) for dest, field in _SETTING_FLAGS.items() if getattr(args, dest, None) is not None
    }
    if "exclude_pattern" in given and given["exclude_pattern"] == "":
        given["exclude_pattern"] = None
    overlay = {
        field: getattr(args, dest) for dest, field in _OVERLAY_FLAGS.items() if getattr(args, dest, None) is not None
    }
    options = {**base.source_options, **dict(parse_override(pair) for pair in args.source_option)}
    return replace(
        base,
        **given,
        overlay=replace(base.overlay, **overlay),
        source_options=options,
        overwrite=args.overwrite or base.overwrite,
    )


def _build(args) -> int:
    src = args.src
    base = None
    if getattr(args, "recipe", None):
        recipe_src, base, recipe_options = load_recipe(args.recipe, parse_assignments(args.variables))
        base = replace(base, source_options={**(recipe_options or {}), **base.source_options})
        src = src if src is not None else recipe_src
    elif getattr(args, "variables", None):
        raise UserError("--set gives recipe variables; use it with --recipe PATH")
    if src is None:
        raise UserError("no source given: usjepa shards build SRC OUT (or --recipe PATH OUT)")
    settings = settings_from_args(args, base)
    workers = resolve_workers(args.workers)
    try:
        result = run_build(
            src, args.out, settings, progress=not args.no_progress, workers=workers, keep_work=args.keep_work
        )
    except KeyboardInterrupt:
        print(f"interrupted: finished work is kept in {args.out}/{WORK_DIR}; run the same command again to resume")
        raise
    manifest, report = result.manifest, result.report
    summary, run = report["summary"], report["run"]
    print(
        f"built {manifest.total} samples into {manifest.root} ({manifest.image_size} px, format "
        f"{manifest.source_format}{' (detected)' if report['source']['format_detected'] else ''})"
    )
    print("\n".join(contents_lines(manifest)))
    print(f"skipped {summary['skipped']}", end="")
    for s in report["skipped"][:5]:
        print(f"\n  {s['source']}: {s['reason']}", end="")
    if summary["skipped"] > 5:
        print(f"\n  ... (all listed in {manifest.root / REPORT_NAME})", end="")
    print()
    print(f"duplicates {summary['duplicates']} (written once)", end="")
    for s in report["duplicates"][:3]:
        print(f"\n  {s['source']} = {s['duplicate_of']}", end="")
    print()
    print(
        f"colour overlays: {summary['overlay_inpainted']} inpainted, {summary['overlay_flagged']} flagged, "
        f"{summary['overlay_skipped']} skipped"
    )
    if settings.max_samples is not None:
        print(
            f"capped at {settings.max_samples} samples ({summary['capped']} more read, "
            f"{summary['items_not_read']} items not read)"
        )
    print(f"sampling weight {manifest.sampling_weight} (cap {manifest.weight_cap})")
    seconds = run["seconds"]
    reused = f", {run['items_reused']} items reused from an earlier run" if run["items_reused"] else ""
    print(
        f"{seconds['total']:.1f} s ({seconds['process']:.1f} s processing, {seconds['pack']:.1f} s packing), "
        f"{run['frames_per_second']:.0f} images/s with {run['workers']} worker(s){reused}"
    )
    return 0


def _verify(args) -> int:
    report = verify_shards(args.out)
    print(f"ok: {report['samples']} samples in {report['shards_dir']} verified in {report['seconds']:.1f} s")
    for split, r in report["splits"].items():
        print(f"{split:5s} {r['count']:7d} samples, {r['shards']} shard(s), {r['groups']} groups")
    print(
        f"colour overlays: {report['inpainted']} inpainted, {report['overlay_flagged']} flagged; "
        f"skipped at build {report['skipped_at_build']}, duplicates at build {report['duplicates_at_build']}"
    )
    if report["unlisted_shards"]:
        unlisted = report["unlisted_shards"]
        print(f"note: {len(unlisted)} shard file(s) not in the manifest (ignored): {unlisted[:5]}")
    if report["leftover_work"]:
        print(f"note: {report['shards_dir']}/{WORK_DIR} holds kept build work (--keep-work); delete it when not needed")
    return 0


def _inspect(args) -> int:
    manifest = load_manifest(args.out)
    print("\n".join(summary_lines(manifest)))
    if args.grid:
        drawn = contact_sheet(args.out, args.grid, split=args.split, n=args.n, columns=args.columns)
        print(
            f"contact sheet: {drawn['samples']} {drawn['split']} samples -> {drawn['path']} "
            f"({drawn['size'][0]}x{drawn['size'][1]} px)"
        )
    return 0
