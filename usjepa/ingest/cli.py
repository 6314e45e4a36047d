"""`usjepa shards build SRC OUT`, `usjepa shards verify OUT`, `usjepa shards inspect OUT`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from functools import reduce

from usjepa.config import parse_override
from usjepa.errors import UserError
from usjepa.ingest.build.run import run_build
from usjepa.ingest.build.workdir import WORK_DIR
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

# Flags that set a BuildSettings field (dotted: a field of a nested setting) -> (field, argparse keywords).
# Each defaults to None ("not given"), so a recipe's settings hold unless the flag is given explicitly.
_SETTING_FLAGS = {
    "--format": ("format", {"choices": format_choices()}),
    "--size": ("image_size", {"type": int, "metavar": "SIZE"}),
    "--resize-mode": ("resize_mode", {"choices": RESIZE_MODES}),
    "--shard-size": ("shard_size", {"type": int}),
    "--val-fraction": ("val_fraction", {"type": float}),
    "--test-fraction": ("test_fraction", {"type": float}),
    "--seed": ("seed", {"type": int}),
    "--group-pattern": ("group_pattern", {}),
    "--exclude-pattern": ("exclude_pattern", {}),
    "--max-samples": ("max_samples", {"type": int}),
    "--weight-cap": ("weight_cap", {"type": int}),
    "--overlay-max-fraction": ("overlay.max_fraction", {"type": float}),
    "--overlay-tolerance": ("overlay.tolerance", {"type": int}),
    "--large-overlay": ("large_overlay", {"choices": LARGE_OVERLAY_ACTIONS}),
    "--no-dedup": ("dedup", {"action": "store_const", "const": False}),
}
# The build command's own flags (not settings) -> argparse keywords.
_COMMAND_FLAGS = {
    "--workers": {"type": int, "default": 1},
    "--source-option": {"action": "append", "default": [], "metavar": "KEY=VALUE"},
    "--overwrite": {"action": "store_true"},
    "--keep-work": {"action": "store_true"},
    "--no-progress": {"action": "store_true"},
    "--recipe": {"metavar": "PATH"},
    "--set": {"dest": "variables", "action": "append", "default": [], "metavar": "KEY=VALUE"},
}
# Every build flag's help, in the order `--help` lists them; "{}" is the default of a setting flag's field.
_BUILD_HELP = {
    "--format": f"source layout; '{AUTO}' asks every format whether it recognises SRC (default: {{}})",
    "--workers": "processes that load, preprocess and encode (0: one per CPU core); the output does not depend on "
    "it (default: 1)",
    "--size": "output size in pixels: the side of the square, or the shorter side with --resize-mode short_side "
    "(default: {})",
    "--resize-mode": "pad: pad the region crop to a square, then resize (keeps the aspect ratio); stretch: resize "
    "the crop to a square; short_side: shorter side to --size, aspect kept, not square (default: {})",
    "--shard-size": "at most this many samples per tar (default: {})",
    "--val-fraction": "share of samples for val (default: {})",
    "--test-fraction": "share of samples for test (default: {})",
    "--seed": "seed of the splits, the sample order and the --max-samples choice (default: {})",
    "--group-pattern": "regex; its first capture group, searched in each file name (without extension), is the "
    "patient/video id that splits keep together, e.g. 'patient_(\\d+)'. Default: each image is its own group",
    "--exclude-pattern": "regex; files whose name (without extension) matches are skipped, e.g. segmentation "
    "masks; '' to include everything (default: '{}')",
    "--source-option": "option of the source format, repeatable, e.g. fps=3, max_frames=30, group_by=patient; "
    "the formats' options are listed below (VALUE is read as YAML: numbers, true/false, null, lists)",
    "--max-samples": "keep at most this many samples (deterministic: the first ones in a seeded order of the "
    "items, after failures and duplicates; default: all)",
    "--weight-cap": "manifest sampling_weight = min(train samples, this) for dataset mixing (default: {})",
    "--overlay-max-fraction": "colour overlays covering less than this share of an image are inpainted, larger "
    "ones flagged (default: {})",
    "--overlay-tolerance": "a pixel is coloured when its channels differ by more than this (default: {})",
    "--large-overlay": "images with large colour overlays: keep and flag them, or skip them (default: {})",
    "--no-dedup": "keep identical images (default: each distinct preprocessed image is written once)",
    "--overwrite": "replace an existing shard set in OUT (and unfinished work made with other settings)",
    "--keep-work": f"keep OUT/{WORK_DIR} after the build: a later --overwrite build with the same preprocessing "
    "then only re-splits and re-packs",
    "--no-progress": "no progress bars",
    "--recipe": "build recipe (YAML): source, format, settings",
    "--set": "recipe variable ${NAME}, repeatable (e.g. --set BUSI=/data/busi)",
}


class _IntermixedParser(argparse.ArgumentParser):
    """Takes options and positionals in any order (`build SRC --format csv OUT`): argparse's own
    parse_known_args stops filling positionals at the first option, leaving OUT unrecognised."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back in here for its two passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _dest(field: str) -> str:
    return field.replace(".", "_")


def register_cli(subparsers) -> None:
    """Add `shards` (with `build`, `verify` and `inspect`) to the `usjepa` command's subparsers."""
    shards = subparsers.add_parser(
        "shards",
        description="Turn a source (image folder, ...) into WebDataset tar shards (grayscale with colour "
        "overlays inpainted or flagged, ultrasound-region mask, crop, percentile stretch, dedup, "
        "group-disjoint train/val/test splits) and check or look at them.",
    )
    shards.set_defaults(func=lambda args: _print_help(shards))
    sub = shards.add_subparsers(dest="shards_command", metavar="{build,verify,inspect}", parser_class=_IntermixedParser)
    _add_build(sub)
    verify = sub.add_parser(
        "verify",
        help="decode every sample and check it against the manifest",
        description="Check sha256, counts, labels, image size, region masks, build fields (overlay flags, "
        "pixel hashes: no duplicates when deduplicated) and the sampling weight of a shard set.",
    )
    verify.add_argument("out", metavar="OUT", help="folder holding manifest.json and the shards")
    verify.set_defaults(func=_verify)
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
    defaults = BuildSettings()
    for flag, help_text in _BUILD_HELP.items():
        if flag in _SETTING_FLAGS:
            field, keywords = _SETTING_FLAGS[flag]
            default = reduce(getattr, field.split("."), defaults)
            build.add_argument(flag, dest=_dest(field), default=None, help=help_text.format(default), **keywords)
        else:
            build.add_argument(flag, help=help_text, **_COMMAND_FLAGS[flag])
    build.set_defaults(func=_build)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def settings_from_args(args, base: BuildSettings | None = None) -> BuildSettings:
    """BuildSettings from `base` (defaults or a recipe's) and the flags given explicitly."""
    base = base or BuildSettings()
    given = {field: getattr(args, _dest(field), None) for field, _ in _SETTING_FLAGS.values()}
    given = {field: value for field, value in given.items() if value is not None}
    if given.get("exclude_pattern") == "":
        given["exclude_pattern"] = None
    overlay = {field.split(".")[1]: given.pop(field) for field in list(given) if field.startswith("overlay.")}
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
    try:
        result = run_build(
            src, args.out, settings, progress=not args.no_progress, workers=args.workers, keep_work=args.keep_work
        )
    except KeyboardInterrupt:
        print(f"interrupted: finished work is kept in {args.out}/{WORK_DIR}; run the same command again to resume")
        raise
    _print_build(result.manifest, result.report, settings)
    return 0


def _print_build(manifest, report: dict, settings: BuildSettings) -> None:
    summary, run = report["summary"], report["run"]
    detected = " (detected)" if report["source"]["format_detected"] else ""
    print(
        f"built {manifest.total} samples into {manifest.root} ({manifest.image_size} px, format "
        f"{manifest.source_format}{detected})"
    )
    lines = contents_lines(manifest) + [f"skipped {summary['skipped']}"]
    lines += [f"  {s['source']}: {s['reason']}" for s in report["skipped"][:5]]
    if summary["skipped"] > 5:
        lines.append(f"  ... (all listed in {manifest.root / REPORT_NAME})")
    lines.append(f"duplicates {summary['duplicates']} (written once)")
    lines += [f"  {s['source']} = {s['duplicate_of']}" for s in report["duplicates"][:3]]
    lines.append(
        f"colour overlays: {summary['overlay_inpainted']} inpainted, {summary['overlay_flagged']} flagged, "
        f"{summary['overlay_skipped']} skipped"
    )
    if settings.max_samples is not None:
        lines.append(
            f"capped at {settings.max_samples} samples ({summary['capped']} more read, "
            f"{summary['items_not_read']} items not read)"
        )
    lines.append(f"sampling weight {manifest.sampling_weight} (cap {manifest.weight_cap})")
    seconds = run["seconds"]
    reused = f", {run['items_reused']} items reused from an earlier run" if run["items_reused"] else ""
    lines.append(
        f"{seconds['total']:.1f} s ({seconds['process']:.1f} s processing, {seconds['pack']:.1f} s packing), "
        f"{run['frames_per_second']:.0f} images/s with {run['workers']} worker(s){reused}"
    )
    print("\n".join(lines))


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
