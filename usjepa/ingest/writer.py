"""Build a shard set: source -> per-item work (parallel, resumable) -> packed shards -> manifest.

This module holds the settings and the order of the steps; each step lives in a module of
its own:

Phase 1, process (`process.py`, `work.py`, `workdir.py`). The source's items are taken in a
seeded order (sha256 of seed and key). Each item is loaded, converted to grayscale,
preprocessed and PNG-encoded by `process_item`; the result, failures included, is written
atomically to `OUT/.work/items/`, keyed by the work fingerprint (every setting that changes
a result), the item key and the item file's size and mtime. Items run in `workers`
processes; results are consumed in the seeded order, so nothing downstream depends on the
number of workers or on timing. A rerun after an interruption (Ctrl-C, kill -9, a crash)
reuses the results that exist and processes only the rest; a rerun with other settings is
refused (or, with --overwrite, starts over) so results never mix.

Phase 2, select and pack (`selection.py`, `pack.py`; cheap: byte copies). Failures are
listed, duplicates (same preprocessed pixels) dropped, `max_samples` keeps the first N (so
with a cap, phase 1 stops once it has N), large overlays flagged or skipped; splits as the
source prescribes them, else group-disjoint; per split, tars written under temporary names
and renamed when complete. Then `build_report.json`, then `manifest.json` (`record.py`;
last: its presence means a complete build), then `.work/` is removed (unless keep_work).

Same input + same settings -> byte-identical shards and manifests (apart from `created`),
for any number of workers, interrupted or not.
"""

from __future__ import annotations

import inspect
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import usjepa
from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text
from usjepa.shardset.manifest import MANIFEST_NAME, REPORT_NAME, SPLITS, Manifest, write_manifest
from usjepa.ingest.overlay import LARGE_OVERLAY_ACTIONS, OverlaySettings
from usjepa.ingest.pack import SHARD_PATTERN, TarStream, pack_splits, remove_stale
from usjepa.ingest.preprocess import INTERPOLATIONS, RESIZE_MODES, PreprocessSettings
from usjepa.ingest.process import process_items, resolve_workers
from usjepa.ingest.record import describe_source, make_manifest, make_report, summarise
from usjepa.ingest.region import RegionSettings
from usjepa.ingest.selection import assign_samples
from usjepa.ingest.sources import DEFAULT_EXCLUDE, SOURCES, SourceItem, open_source
from usjepa.ingest.splits import seeded_order
from usjepa.ingest.work import WORK_FORMAT, ItemSettings, process_item, write_result
from usjepa.ingest.workdir import WORK_DIR, WorkDir

GROUPING_OPTIONS = ("group_pattern", "exclude_pattern")  # decide items and groups, never pixels
DEFAULT_WEIGHT_CAP = 50_000


@dataclass
class BuildSettings:
    image_size: int = 224
    shard_size: int = 1000
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    group_pattern: str | None = None
    overwrite: bool = False
    format: str = "auto"
    """'auto' (ask every format's `looks_like`, `formats.detect_format`) or a registered name."""
    exclude_pattern: str | None = DEFAULT_EXCLUDE
    stratify: bool = True
    low_percentile: float = 2.0
    high_percentile: float = 98.0
    resize_mode: str = "pad"
    interpolation: str = "bicubic"
    region: RegionSettings = field(default_factory=RegionSettings)
    overlay: OverlaySettings = field(default_factory=OverlaySettings)
    large_overlay: str = "flag"
    """Samples whose colour overlays cover >= overlay.max_fraction: 'flag' (keep, meta
    overlay_flagged: true) or 'skip' (leave out, listed in the build report)."""
    dedup: bool = True
    """Write identical preprocessed images once (content hash); duplicates are listed."""
    max_samples: int | None = None
    """Keep at most this many samples: the first ones in the seeded item order (all frames
    of an item in order), after failures and duplicates are left out."""
    weight_cap: int = DEFAULT_WEIGHT_CAP
    """Manifest `sampling_weight` = min(train samples, weight_cap) (the US-JEPA paper: min(|D|, 50,000))."""
    source_options: dict = field(default_factory=dict)
    """Keyword options for the source's constructor (e.g. fps=3, max_frames=30)."""

    def preprocess_settings(self) -> PreprocessSettings:
        return PreprocessSettings(
            image_size=self.image_size,
            low_percentile=self.low_percentile,
            high_percentile=self.high_percentile,
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
            region=self.region,
        )

    def item_settings(self) -> ItemSettings:
        return ItemSettings(self.preprocess_settings(), self.overlay)

    def validate(self) -> None:
        from usjepa.ingest.formats import format_choices  # registers every source format

        problems = []
        if not isinstance(self.image_size, int) or self.image_size < 8:
            problems.append(f"image size {self.image_size!r} must be an integer >= 8")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            problems.append(f"shard size {self.shard_size!r} must be an integer >= 1")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                problems.append(f"{name.replace('_', ' ')} {value} must be in [0, 1]")
        if self.val_fraction + self.test_fraction > 1:
            problems.append(f"val + test fractions ({self.val_fraction} + {self.test_fraction}) exceed 1")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            problems.append(f"percentiles {self.low_percentile}/{self.high_percentile} need 0 <= low < high <= 100")
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f"resize mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if self.format not in format_choices():
            problems.append(f"source format {self.format!r} is not one of {', '.join(format_choices())}")
        if self.large_overlay not in LARGE_OVERLAY_ACTIONS:
            problems.append(f"large overlay action {self.large_overlay!r} is not one of {', '.join(LARGE_OVERLAY_ACTIONS)}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            problems.append(f"max samples {self.max_samples!r} must be a positive integer (or unset)")
        if not isinstance(self.weight_cap, int) or self.weight_cap < 1:
            problems.append(f"weight cap {self.weight_cap!r} must be a positive integer")
        if not isinstance(self.source_options, dict):
            problems.append(f"source options must be a mapping of option name to value, got {self.source_options!r}")
        problems += self.overlay.problems()
        if problems:
            raise UserError("invalid shard build settings: " + "; ".join(problems))


@dataclass
class BuildResult:
    manifest: Manifest
    report: dict


def run_build(src, out, settings: BuildSettings | None = None, progress: bool = True, workers: int = 1,
              keep_work: bool = False) -> BuildResult:
    """Build the shard set for the source at `src` into `out` (see the module docstring).

    workers: processes for phase 1 (1: in this process; 0: one per CPU core). keep_work:
    leave OUT/.work in place after success (a later --overwrite build with the same
    processing settings then only re-selects, re-splits and re-packs)."""
    from usjepa.ingest.formats import AUTO, detect_format

    started = time.perf_counter()
    settings = settings or BuildSettings()
    settings.validate()
    workers = resolve_workers(workers)
    out = Path(out).expanduser().absolute()
    src = Path(src).expanduser()
    name = detect_format(src) if settings.format == AUTO else settings.format
    options = _source_options(name, settings)
    source = open_source(name, src, **options, **_build_options(name, settings, out))
    items = _items_in_order(source, name)
    order = seeded_order([it.key for it in items], settings.seed, salt="process")
    listed = time.perf_counter()

    _prepare_out(out, settings.overwrite)
    fingerprint = _jsonable({
        "work_format": WORK_FORMAT,
        "tool_version": usjepa.__version__,
        "source_format": name,
        "source_root": str(source.root),
        "source_options": {k: v for k, v in options.items() if k not in GROUPING_OPTIONS},
        "preprocess": asdict(settings.preprocess_settings()),
        "overlay": asdict(settings.overlay),
    })
    work = WorkDir(out, fingerprint, settings.overwrite)
    try:
        selection, run_stats = process_items(items, order, work, settings, workers, progress)
        processed = time.perf_counter()
        splits_of, split_info = assign_samples(selection.kept, items, settings)
        summary = summarise(len(items), selection, run_stats["items_not_read"])
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        described = describe_source(source, name, settings.format == AUTO, _jsonable(options))
        report = make_report(out, created, described, summary, selection, {"workers": workers, **run_stats})
        if not selection.kept:
            reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in selection.failed[:3])
            atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2) + "\n")
            work.remove()
            raise UserError(
                f"none of the {len(items)} items under {source.root} could be used ({reasons}); every reason is in "
                f"{out / REPORT_NAME}; check the files"
            )
        splits = pack_splits(out, selection, splits_of, items, source.classes, settings, work.dir, progress)
        remove_stale(out, {s.name for info in splits.values() for s in info.shards})
        packed = time.perf_counter()
        manifest = make_manifest(out, source, described, settings, splits, split_info, selection, summary, created)
        seconds = time.perf_counter() - started
        report["run"].update(
            seconds={"list": round(listed - started, 3), "process": round(processed - listed, 3),
                     "pack": round(packed - processed, 3), "total": round(seconds, 3)},
            frames_per_second=round(selection.frames / max(processed - listed, 1e-9), 1),
        )
        atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2) + "\n")
        write_manifest(manifest)  # last: its presence means a complete build
    except BaseException:
        work.release()
        raise
    if keep_work:
        work.release()
    else:
        work.remove()
    return BuildResult(manifest, report)


def build_shards(src, out, settings: BuildSettings | None = None, progress: bool = True, workers: int = 1,
                 keep_work: bool = False) -> Manifest:
    """Build the shard set for the source at `src` into `out`; returns its manifest (the
    build report is `out/build_report.json`; `run_build` returns both)."""
    return run_build(src, out, settings, progress, workers, keep_work).manifest


def timed_build(src, out, settings: BuildSettings, progress: bool = True, workers: int = 1,
                keep_work: bool = False) -> tuple[Manifest, float]:
    """`build_shards` plus its wall time in seconds (the manifest itself holds no timings,
    so two builds of the same input compare equal apart from `created`)."""
    start = time.perf_counter()
    manifest = build_shards(src, out, settings, progress, workers, keep_work)
    return manifest, time.perf_counter() - start


# ---------------------------------------------------------------------------- helpers
def _constructor_parameters(name: str) -> tuple[list[str], bool]:
    """(the keyword parameters after the root, whether it takes **kwargs) of source `name`'s constructor."""
    try:
        params = list(inspect.signature(SOURCES[name]).parameters.values())
    except (TypeError, ValueError):
        params = []
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return named[1:], takes_any  # the first is the root


def _source_options(name: str, settings: BuildSettings) -> dict:
    """Constructor options for source `name`, as recorded in the manifest: --source-option
    values plus the group and exclude patterns where they differ from the build's defaults
    (at the default a source keeps its own: imagefolder, dicom and video leave out '_mask'
    files, csv, filenames and ultrabench list every file); UserError for options it does not take."""
    options = dict(settings.source_options)
    accepted, takes_any = _constructor_parameters(name)
    takes = ", ".join(accepted) if accepted else "no options"
    for key in GROUPING_OPTIONS:
        value, default = getattr(settings, key), getattr(BuildSettings, key)
        if key in options:
            if value != default and options[key] != value:
                raise UserError(f"{key} is given twice with different values ({value!r} and source option "
                                f"{options[key]!r}); give it once")
        elif value == default:
            continue
        elif key in accepted or takes_any:
            options[key] = value
        else:
            raise UserError(f"--{key.replace('_', '-')} does not apply to source format {name!r} (it takes: {takes})")
    unknown = [k for k in options if k not in accepted] if not takes_any else []
    if unknown:
        raise UserError(f"source format {name!r} has no option {', '.join(map(repr, unknown))} (it takes: {takes})")
    return options


def _build_options(name: str, settings: BuildSettings, out: Path) -> dict:
    """What the build itself hands a source whose constructor names the parameter, unless a
    source option sets it: `output_dir` (DICOM refuses a de-identification salt file inside
    OUT) and `region` (videos detect their region with the build's region settings). Not
    in the recorded options or the work fingerprint: OUT is where both live, and the region
    settings are recorded (`region_detection`) and fingerprinted (`preprocess`) already.
    Not for a source that only takes **kwargs: it never asked for them."""
    accepted, _ = _constructor_parameters(name)
    given = {"output_dir": out, "region": settings.region}
    return {k: v for k, v in given.items() if k in accepted and k not in settings.source_options}


def _items_in_order(source, name: str) -> list[SourceItem]:
    items = list(source)
    if not items:
        looks_for = getattr(type(source), "looks_for", "") or "its input files"
        raise UserError(f"source format {name!r} found nothing to ingest in {source.root} (it looks for {looks_for})")
    duplicates = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if duplicates:  # a source bug, not a user mistake
        raise RuntimeError(f"source {name} produced duplicate keys, e.g. {duplicates[:3]}")
    bad = [it for it in items if it.split is not None and it.split not in SPLITS]
    if bad:
        raise UserError(f"source item {bad[0].source!r} prescribes split {bad[0].split!r}; splits are {', '.join(SPLITS)}")
    return items


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; choose a folder path for OUT")
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        if not overwrite:
            raise UserError(
                f"{out} already holds a shard set ({MANIFEST_NAME}); pass --overwrite to replace it "
                "or choose another OUT"
            )
        manifest.unlink()  # first: from here on the folder no longer claims a complete build
    out.mkdir(parents=True, exist_ok=True)


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


__all__ = ["SHARD_PATTERN", "WORK_DIR", "BuildResult", "BuildSettings", "ItemSettings", "TarStream", "build_shards",
           "process_item", "resolve_workers", "run_build", "timed_build", "write_result"]
