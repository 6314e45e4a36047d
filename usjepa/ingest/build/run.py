"""A shard build, step by step: source -> per-item work (parallel, resumable) -> selection and
splits -> packed shards -> report and manifest (docs/data.md#build-steps). Same input and
settings give byte-identical shards for any number of workers, interrupted or not."""

from __future__ import annotations

import errno
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import usjepa
from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text, make_folder
from usjepa.ingest.build.pack import SHARD_PATTERN, TEMP_PATTERN, pack_splits, remove_stale
from usjepa.ingest.build.record import describe_source, make_manifest, make_report, summarise
from usjepa.ingest.build.select import assign_samples
from usjepa.ingest.build.splits import seeded_order
from usjepa.ingest.build.workdir import WORK_DIR, WORK_FORMAT, WorkDir, naming
from usjepa.ingest.build.workers import process_items, resolve_workers
from usjepa.ingest.settings import BuildSettings
from usjepa.ingest.sources.base import SOURCES, Source, SourceItem, open_source, option_names
from usjepa.ingest.sources.detect import AUTO, detect_format
from usjepa.shardset.manifest import MANIFEST_NAME, REPORT_NAME, SPLITS, Manifest, write_manifest

GROUPING_OPTIONS = ("group_pattern", "exclude_pattern")  # decide items and groups, never pixels


@dataclass
class BuildResult:
    manifest: Manifest
    report: dict


def run_build(
    src, out, settings: BuildSettings | None = None, progress: bool = True, workers: int = 1, keep_work: bool = False
) -> BuildResult:
    """Build the shard set for the source at `src` into `out`. workers: processes for phase 1
    (0: one per CPU core). keep_work: leave OUT/.work in place (a later --overwrite build with
    the same processing settings then only re-selects, re-splits and re-packs)."""
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
    times = {"started": started, "listed": time.perf_counter()}
    _prepare_out(out, src, settings.overwrite)
    try:
        work = WorkDir(out, _fingerprint(name, source, options, settings), settings.overwrite)
    except OSError as exc:
        raise _write_error(exc, out) from None
    try:
        result = _phases(source, name, items, options, settings, work, workers, progress, times)
    except OSError as exc:
        work.release()
        raise _write_error(exc, out) from None
    except BaseException:
        work.release()
        raise
    if keep_work:
        work.release()
    else:
        work.remove()
    return result


def _phases(
    source: Source,
    name: str,
    items: list[SourceItem],
    options: dict,
    settings: BuildSettings,
    work: WorkDir,
    workers: int,
    progress: bool,
    times: dict,
) -> BuildResult:
    out = work.dir.parent
    order = seeded_order([it.key for it in items], settings.seed, salt="process")
    selection, run_stats = process_items(items, order, work, settings, workers, progress)
    times["processed"] = time.perf_counter()
    splits_of, split_info = assign_samples(selection.kept, items, settings)
    summary = summarise(len(items), selection, run_stats["items_not_read"])
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    described = describe_source(source, name, settings.format == AUTO, _jsonable(options))
    report = make_report(out, created, described, summary, selection, {"workers": workers, **run_stats})
    if not selection.kept:
        reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in selection.failed[:3])
        with naming(out / REPORT_NAME):
            atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2) + "\n")
        work.remove()
        raise UserError(
            f"none of the {len(items)} items under {source.root} could be used ({reasons}); every reason "
            f"is in {out / REPORT_NAME}; check the files"
        )
    splits = pack_splits(out, selection, splits_of, items, source.classes, settings, work.dir, progress)
    remove_stale(out, {s.name for info in splits.values() for s in info.shards})
    packed = time.perf_counter()
    manifest = make_manifest(out, source, described, settings, splits, split_info, selection, summary, created)
    listed, processed = times["listed"], times["processed"]
    report["run"].update(
        seconds={
            "list": round(listed - times["started"], 3),
            "process": round(processed - listed, 3),
            "pack": round(packed - processed, 3),
            "total": round(time.perf_counter() - times["started"], 3),
        },
        frames_per_second=round(selection.frames / max(processed - listed, 1e-9), 1),
    )
    with naming(out / REPORT_NAME):
        atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    with naming(out / MANIFEST_NAME):
        write_manifest(manifest)  # last: its presence means a complete build
    return BuildResult(manifest, report)


def build_shards(
    src, out, settings: BuildSettings | None = None, progress: bool = True, workers: int = 1, keep_work: bool = False
) -> Manifest:
    """`run_build`, returning the manifest (the build report is `out/build_report.json`)."""
    return run_build(src, out, settings, progress, workers, keep_work).manifest


def _fingerprint(name: str, source: Source, options: dict, settings: BuildSettings) -> dict:
    """Every setting that changes the result of an item (the work folder is reused only under the same)."""
    return _jsonable(
        {
            "work_format": WORK_FORMAT,
            "tool_version": usjepa.__version__,
            "source_format": name,
            "source_root": str(source.root),
            "source_options": {k: v for k, v in options.items() if k not in GROUPING_OPTIONS},
            "preprocess": asdict(settings.preprocess_settings()),
            "overlay": asdict(settings.overlay),
        }
    )


def _source_options(name: str, settings: BuildSettings) -> dict:
    """Options for source `name`, as recorded in the manifest: the source options plus the group
    and exclude patterns where they differ from the build's defaults (at the default a source
    keeps its own); UserError for a pattern the format does not take."""
    options = dict(settings.source_options)
    accepted = option_names(SOURCES[name])
    for key in GROUPING_OPTIONS:
        value, default = getattr(settings, key), getattr(BuildSettings, key)
        if key in options:
            if value != default and options[key] != value:
                raise UserError(
                    f"{key} is given twice with different values ({value!r} and source option "
                    f"{options[key]!r}); give it once"
                )
        elif value == default:
            continue
        elif key in accepted:
            options[key] = value
        else:
            takes = ", ".join(accepted) or "no options"
            raise UserError(f"--{key.replace('_', '-')} does not apply to source format {name!r} (it takes: {takes})")
    return options


def _build_options(name: str, settings: BuildSettings, out: Path) -> dict:
    """What the build itself hands a source that has such an option and is not given it:
    `output_dir` (DICOM refuses a salt file inside OUT) and `region` (videos detect their region
    with the build's region settings). Neither is recorded nor fingerprinted as a source option:
    OUT is where both live, and the region settings are recorded and fingerprinted already."""
    accepted = option_names(SOURCES[name])
    given = {"output_dir": out, "region": settings.region}
    return {k: v for k, v in given.items() if k in accepted and k not in settings.source_options}


def _items_in_order(source: Source, name: str) -> list[SourceItem]:
    items = list(source)
    if not items:
        raise UserError(
            f"source format {name!r} found nothing to ingest in {source.root} (it looks for "
            f"{type(source).looks_for or 'its input files'})"
        )
    duplicates = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if duplicates:  # a source bug, not a user mistake
        raise RuntimeError(f"source {name} produced duplicate keys, e.g. {duplicates[:3]}")
    bad = [it for it in items if it.split is not None and it.split not in SPLITS]
    if bad:
        raise UserError(
            f"source item {bad[0].source!r} prescribes split {bad[0].split!r}; splits are {', '.join(SPLITS)}"
        )
    return items


def _prepare_out(out: Path, src: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; choose a folder path for OUT")
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise UserError(
            f"OUT {out} is inside the source folder {src}: the shards would be mixed into the data; "
            "choose a folder outside SRC"
        )
    foreign = sorted(p.name for p in out.iterdir() if not _built_here(p.name)) if out.is_dir() else []
    if foreign:
        raise UserError(
            f"OUT {out} holds files that no shard build wrote (first: {', '.join(foreign[:3])}); choose a new or "
            "empty folder, or a folder of an earlier build"
        )
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        if not overwrite:
            raise UserError(
                f"{out} already holds a shard set ({MANIFEST_NAME}); pass --overwrite to replace it or "
                "choose another OUT"
            )
        manifest.unlink()  # first: from here on the folder no longer claims a complete build
    make_folder(out, "the output folder", "choose a folder path for OUT")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out} is not writable; choose a folder you can write to for OUT")


def _built_here(name: str) -> bool:
    """A file or folder that a build writes into OUT."""
    return (
        name in (MANIFEST_NAME, REPORT_NAME, WORK_DIR)
        or SHARD_PATTERN.match(name) is not None
        or TEMP_PATTERN.match(name) is not None
    )


def _write_error(exc: OSError, out: Path) -> Exception:
    """A full disk or a file-size limit as a UserError naming the file; any other OSError as it is."""
    if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return exc
    return UserError(
        f"cannot write {exc.filename or 'a file in ' + str(out)} ({exc.strerror}): free disk space or raise the "
        f"file-size limit (ulimit -f), then run the same command again to resume (finished work in "
        f"{out / WORK_DIR} is kept)"
    )


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))
