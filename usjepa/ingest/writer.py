"""Build a shard set: source -> per-item work (parallel, resumable) -> packed shards -> manifest.

Phase 1, process. The source's items are taken in a seeded order (sha256 of seed and key).
For each item, `process_item` loads every frame (`item.frames()`), turns colour into
grayscale (small colour overlays inpainted, large ones flagged: `overlay.py`), preprocesses
(region, crop, stretch, resize) and PNG-encodes it, and the result, failures included, is
written atomically (temporary name, rename) to `OUT/.work/items/<h[:2]>/<h>.res`, where h
hashes the work fingerprint (every setting that changes a result), the item key and the
item file's size and mtime. Items run in `workers` processes; results are consumed in the
seeded order, so nothing downstream depends on the number of workers or on timing. A
rerun after an interruption (Ctrl-C, kill -9, a crash) finds the results that exist and
processes only the rest. `OUT/.work/settings.json` records the fingerprint: a rerun with
different settings is refused (or, with --overwrite, starts over) so results never mix.

Phase 2, pack (cheap: byte copies). Over the results in the seeded order: failures are
listed; a sample whose preprocessed pixels hash like an earlier one is a duplicate
(dropped, counted, listed); `max_samples` keeps the first N (so with a cap, phase 1 stops
once it has N); samples with large overlays are kept and flagged, or skipped
(`large_overlay`). Then splits: the split a source prescribes (`item.split`), else
group-disjoint by `assign_splits` over the samples (frames of one video stay together).
Per split, samples in a seeded order go into tars written under hidden temporary names
and renamed when complete. Then `build_report.json`, then `manifest.json` (last: its
presence means a complete build), then `.work/` is removed (unless keep_work).

Same input + same settings -> byte-identical shards and manifests (apart from `created`),
for any number of workers, interrupted or not.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import struct
import tarfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import usjepa
from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text
from usjepa.ingest import sample_format
from usjepa.ingest.manifest import (
    MANIFEST_NAME,
    MAX_SKIPPED_LISTED,
    REPORT_NAME,
    SPLITS,
    Manifest,
    ShardInfo,
    SplitInfo,
    write_manifest,
)
from usjepa.ingest.overlay import LARGE_OVERLAY_ACTIONS, OverlaySettings, to_gray
from usjepa.ingest.preprocess import INTERPOLATIONS, RESIZE_MODES, PreprocessError, PreprocessSettings, preprocess
from usjepa.ingest.region import RegionSettings
from usjepa.ingest.sources import DEFAULT_EXCLUDE, SOURCES, SourceItem, open_source
from usjepa.ingest.splits import assign_splits, seeded_order

SHARD_PATTERN = re.compile(r"^(train|val|test)-\d{6}\.tar$")
TEMP_PATTERN = re.compile(r"^\.(train|val|test)-\d{6}\.tar\.tmp-\d+$")
TAR_MTIME = 0  # fixed member times: same input + settings -> byte-identical shards
WORK_DIR = ".work"
WORK_FORMAT = 1  # bump when a result file's content or meaning changes
RESULT_MAGIC = b"USJWRES1"
_FIXED = struct.Struct("<IIQ")  # header length, header crc32, payload length
GROUPING_OPTIONS = ("group_pattern", "exclude_pattern")  # decide items and groups, never pixels
DEFAULT_WEIGHT_CAP = 50_000
DUPLICATES_IN_MANIFEST = 10


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
    """Manifest `sampling_weight` = min(train samples, weight_cap) (PAPER.md: min(|D|, 50,000))."""
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


# ============================================================================ phase 1: per item
@dataclass(frozen=True)
class ItemSettings:
    """Everything that changes the result of one item (what a worker needs)."""

    preprocess: PreprocessSettings
    overlay: OverlaySettings


def _normalise_pixels(image) -> tuple[np.ndarray | None, str | None]:
    """(uint8 (H, W) or (H, W, 3), None) from what a source returned, or (None, problem)."""
    if not isinstance(image, np.ndarray):
        return None, f"expected a numpy array, got {type(image).__name__}"
    if image.dtype != np.uint8:
        return None, f"expected uint8 pixels, got {image.dtype}"
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    elif image.ndim == 3 and image.shape[2] == 4:  # RGBA: alpha dropped
        image = image[..., :3]
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3):
        return np.ascontiguousarray(image), None
    return None, f"expected (H, W) or (H, W, 3) pixels, got shape {image.shape}"


def _process_frame(loaded, settings: ItemSettings) -> tuple[dict, list[bytes] | None]:
    info = dict(loaded.info or {})
    frame = info.get("frame")
    entry: dict = {"frame": None if frame is None else int(frame)}
    image, problem = _normalise_pixels(loaded.image)
    if problem is not None:
        entry.update(status="failed", stage="read", reason=f"unsupported pixels from the source: {problem}")
        return entry, None
    gray, overlay_info = to_gray(image, settings.overlay)
    try:
        out = preprocess(gray, settings.preprocess, loaded.region)
    except PreprocessError as exc:
        entry.update(status="failed", stage="preprocess", reason=str(exc))
        return entry, None
    digest = sample_format.pixel_hash(out.image)
    meta = {
        **info,
        **overlay_info,
        **out.info,
        "pixel_hash": digest,
        "region_source": "detected" if loaded.region is None else "source",
    }
    image_png, region_png = sample_format.encode_pixels(out.image, out.region)
    entry.update(
        status="ok",
        hash=digest,
        color_fraction=overlay_info["color_fraction"],
        inpainted=overlay_info["inpainted"],
        flagged=overlay_info["overlay_flagged"],
    )
    return entry, [image_png, region_png, sample_format.encode_meta(meta)]


def process_item(item: SourceItem, settings: ItemSettings) -> tuple[dict, bytes]:
    """Load, convert, preprocess and encode every frame of one item: (header, payload).

    The header lists the frames (status ok / failed with stage and reason; for ok frames
    the pixel hash, overlay facts, and where its three members lie in the payload) and an
    item-level `error` when reading stopped (the frames read before are kept). Anything the
    source raises is an unreadable input; errors in the preprocessing other than
    PreprocessError are bugs and propagate."""
    header: dict = {"key": item.key, "error": None, "frames": []}
    chunks: list[bytes] = []
    offset = 0
    count = 0
    try:
        frames = iter(item.frames())
    except Exception as exc:  # noqa: BLE001  (corrupt, truncated, unsupported: never stop the build)
        frames = None
        header["error"] = f"unreadable: {type(exc).__name__}: {exc}"
    while frames is not None:
        try:
            loaded = next(frames)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001
            after = f" (after {count} frame(s))" if count else ""
            header["error"] = f"unreadable: {type(exc).__name__}: {exc}{after}"
            break
        count += 1
        entry, blobs = _process_frame(loaded, settings)
        if blobs is not None:
            data = b"".join(blobs)
            entry.update(offset=offset, sizes=[len(b) for b in blobs], crc=zlib.crc32(data))
            chunks.append(data)
            offset += len(data)
        header["frames"].append(entry)
    if header["error"] is None and count == 0:
        header["error"] = "unreadable: the item holds no image (no frames)"
    return header, b"".join(chunks)


def write_result(path: Path, header: dict, payload: bytes) -> int:
    """Write a result file atomically (temporary name, rename); returns the payload's offset.

    Layout: magic, (header length, header crc32, payload length), header JSON, payload. No
    fsync per file: a killed process leaves whole files (the rename is atomic); after a
    power loss a damaged file fails its length or crc check and is simply redone."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(RESULT_MAGIC + _FIXED.pack(len(head), zlib.crc32(head), len(payload)))
        f.write(head)
        f.write(payload)
    os.replace(tmp, path)
    return len(RESULT_MAGIC) + _FIXED.size + len(head)


def read_result(path: Path) -> tuple[dict, int] | None:
    """(header, payload offset) of a complete, intact result file; None when it is missing
    or damaged (a damaged one is deleted so it is redone)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        fixed = f.read(len(RESULT_MAGIC) + _FIXED.size)
        ok = len(fixed) == len(RESULT_MAGIC) + _FIXED.size and fixed.startswith(RESULT_MAGIC)
        if ok:
            head_len, head_crc, payload_len = _FIXED.unpack(fixed[len(RESULT_MAGIC) :])
            head = f.read(head_len)
            base = len(fixed) + head_len
            ok = (
                len(head) == head_len
                and zlib.crc32(head) == head_crc
                and os.fstat(f.fileno()).st_size == base + payload_len
            )
    if not ok:
        path.unlink(missing_ok=True)
        return None
    return json.loads(head), base


def _run_batch(tasks: list[tuple[SourceItem, str]], settings: ItemSettings) -> list[tuple[dict, int]]:
    """Worker entry point: process items and write their result files."""
    out = []
    for item, path in tasks:
        header, payload = process_item(item, settings)
        out.append((header, write_result(Path(path), header, payload)))
    return out


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group: the parent handles it, workers finish their
    # item and leave when the pool shuts down. If the parent dies (kill -9), exit too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:

        def watch() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _pool_context():
    # fork where there is one (Linux; what torch's DataLoader uses): workers start at once and
    # never re-import the caller's __main__ (spawn and forkserver do, which breaks scripts
    # without a main guard). Workers only run numpy/PIL/scipy code, nothing that needs a
    # lock a parent thread could hold. The build's lock is a POSIX record lock (lockf),
    # which forked children do not inherit. Elsewhere: spawn.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def resolve_workers(workers: int) -> int:
    """0 or less: one per available CPU core."""
    if workers and workers > 0:
        return int(workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ============================================================================ selection
class Kept(NamedTuple):
    index: int  # item index (in the source's listing)
    key: str  # sample key
    path: str  # result file
    start: int  # absolute offset of the frame's members in the result file
    sizes: tuple[int, int, int]
    crc: int
    flagged: bool
    inpainted: bool
    color_fraction: float


class Selection:
    """Decides, over results fed in the seeded item order, which samples are written."""

    def __init__(self, settings: BuildSettings, items: list[SourceItem]):
        self.items = items
        self.dedup = settings.dedup
        self.cap = settings.max_samples
        self.skip_large = settings.large_overlay == "skip"
        self.max_fraction = settings.overlay.max_fraction
        self.kept: list[Kept] = []
        self.failed: list[dict] = []
        self.duplicates: list[dict] = []
        self.flagged: list[dict] = []
        self.owner: dict[bytes, int] = {}  # pixel hash (16 bytes) -> index of the kept sample
        self.items_read = 0
        self.frames = 0
        self.capped = 0
        self.inpainted = 0

    @property
    def full(self) -> bool:
        return self.cap is not None and len(self.kept) >= self.cap

    def feed(self, index: int, header: dict, base: int, path: str) -> None:
        item = self.items[index]
        self.items_read += 1
        for entry in header["frames"]:
            self.frames += 1
            key = sample_format.frame_key(item.key, entry["frame"])
            where = {"source": item.source, "key": key}
            if entry["frame"] is not None:
                where["frame"] = entry["frame"]
            if entry["status"] != "ok":
                self.failed.append({**where, "stage": entry["stage"], "reason": entry["reason"]})
                continue
            flagged = {**where, "color_fraction": entry["color_fraction"]}
            if entry["flagged"] and self.skip_large:
                self.flagged.append({**flagged, "kept": False})
                self.failed.append({
                    **where,
                    "stage": "overlay",
                    "reason": f"colour overlays cover {entry['color_fraction']:.1%} of the image "
                    f"(>= {self.max_fraction:.0%}; large_overlay=skip)",
                })
                continue
            digest = bytes.fromhex(entry["hash"])
            if self.dedup and digest in self.owner:
                first = self.kept[self.owner[digest]]
                self.duplicates.append({**where, "duplicate_of": self.items[first.index].source,
                                        "duplicate_of_key": first.key, "pixel_hash": entry["hash"]})
                continue
            if self.full:
                self.capped += 1
                continue
            self.owner[digest] = len(self.kept)
            self.inpainted += bool(entry["inpainted"])
            if entry["flagged"]:
                self.flagged.append({**flagged, "kept": True})
            self.kept.append(Kept(index, key, path, base + entry["offset"], tuple(entry["sizes"]), entry["crc"],
                                  bool(entry["flagged"]), bool(entry["inpainted"]), float(entry["color_fraction"])))
        if header["error"]:
            self.failed.append({"source": item.source, "key": item.key, "stage": "read", "reason": header["error"]})


# ============================================================================ phase 2: shards
class TarStream:
    """Writes samples ({'__key__': key, ext: bytes, ...}) as a WebDataset tar: one member
    `<key>.<ext>` per extension in sorted order, USTAR headers with fixed mtime, mode 0444 and
    owner; the same bytes as `webdataset.TarWriter(encoder=False, mtime=TAR_MTIME,
    user="usjepa", group="usjepa")`, without importing webdataset (which imports torch)."""

    def __init__(self, fileobj):
        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o0444
            info.uname = info.gname = "usjepa"
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()


class ShardSink:
    """Writes samples of one split into `OUT/{split}-{index:06d}.tar`, at most `shard_size`
    per tar; each tar appears under its final name only once it is complete."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.shards: list[ShardInfo] = []
        self._file = self._writer = self._tmp = None
        self._count = 0

    def write(self, sample: dict) -> None:
        if self._writer is None or self._count >= self.shard_size:
            self._finish()
            self._start()
        self._writer.write(sample)
        self._count += 1

    def _start(self) -> None:
        self._name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.out / f".{self._name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._writer = TarStream(self._file)
        self._count = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        with open(self._tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.replace(self._tmp, self.out / self._name)
        self.shards.append(ShardInfo(self._name, self._count, digest))
        self._writer = self._file = self._tmp = None

    def close(self) -> list[ShardInfo]:
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the unfinished tar (complete ones stay; no manifest will claim them)."""
        if self._writer is not None:
            try:
                self._writer.close()  # flush the tar stream before its file goes away
            except Exception:
                pass
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
        self._writer = self._file = self._tmp = None


def _read_members(kept: Kept, work: Path) -> tuple[bytes, bytes, dict]:
    with open(kept.path, "rb") as f:
        f.seek(kept.start)
        data = f.read(sum(kept.sizes))
    if len(data) != sum(kept.sizes) or zlib.crc32(data) != kept.crc:
        Path(kept.path).unlink(missing_ok=True)
        raise UserError(
            f"work file {kept.path} is damaged (sample {kept.key}); it was removed: rerun the same command "
            f"to redo that item (finished work in {work} is kept)"
        )
    a, b, _ = kept.sizes
    return data[:a], data[a : a + b], json.loads(data[a + b :])


# ============================================================================ the build
@dataclass
class BuildResult:
    manifest: Manifest
    report: dict


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


def _remove_stale(out: Path, keep: set[str]) -> None:
    for path in out.iterdir():
        if (SHARD_PATTERN.match(path.name) and path.name not in keep) or TEMP_PATTERN.match(path.name):
            path.unlink(missing_ok=True)


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _Work:
    """OUT/.work: settings of the build that made it, an exclusive lock, result files."""

    def __init__(self, out: Path, fingerprint: dict, overwrite: bool):
        self.dir = out / WORK_DIR
        self.items = self.dir / "items"
        self.fingerprint = fingerprint
        self.digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        settings_path = self.dir / "settings.json"
        previous = None
        if settings_path.is_file():
            try:
                previous = json.loads(settings_path.read_text(encoding="utf-8")).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                previous = None
        if previous is not None and previous != fingerprint:
            if not overwrite:
                old, new = _flatten(previous), _flatten(fingerprint)
                diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                self.release()
                raise UserError(
                    f"{self.dir} holds the unfinished work of a build with other settings ({'; '.join(diffs[:5])}); "
                    "rerun with the same settings to resume it, or pass --overwrite to discard it and start over"
                )
            previous = None
        if previous is None:  # new, changed (with --overwrite) or unreadable: start afresh
            shutil.rmtree(self.items, ignore_errors=True)
            atomic_write_text(settings_path, json.dumps({"fingerprint": fingerprint}, indent=2, sort_keys=True) + "\n")
        self.items.mkdir(exist_ok=True)
        for i in range(256):
            (self.items / f"{i:02x}").mkdir(exist_ok=True)

    def _lock(self) -> None:
        self._lock_file = open(self.dir / "lock", "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            # lockf (POSIX record lock): owned by this process only, not by the workers
            fcntl.lockf(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise UserError(
                f"another `usjepa shards build` is writing into {self.dir.parent} (lock {self.dir / 'lock'} is "
                "held); wait for it to finish or choose another OUT"
            ) from None

    def release(self) -> None:
        if not self._lock_file.closed:
            self._lock_file.close()

    def path_of(self, item: SourceItem) -> Path:
        signature = ""
        item_path = getattr(item, "path", None)
        if isinstance(item_path, (str, os.PathLike)):
            try:
                st = os.stat(item_path)
                signature = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                signature = "missing"
        h = hashlib.sha256(f"{self.digest}\0{item.key}\0{signature}".encode()).hexdigest()[:40]
        return self.items / h[:2] / f"{h[2:]}.res"

    def count_results(self) -> int:
        return sum(1 for sub in self.items.iterdir() if sub.is_dir() for p in sub.iterdir() if p.suffix == ".res")

    def remove(self) -> None:
        self.release()
        shutil.rmtree(self.dir, ignore_errors=True)


def _source_options(name: str, settings: BuildSettings) -> dict:
    """Constructor options for source `name`: --source-option values plus the group and
    exclude patterns where the source takes them; UserError for options it does not take."""
    cls = SOURCES[name]
    options = dict(settings.source_options)
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        params = []
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    accepted = named[1:]  # the first is the root
    takes = ", ".join(accepted) if accepted else "no options"
    for key, value, default in (("group_pattern", settings.group_pattern, None),
                                ("exclude_pattern", settings.exclude_pattern, DEFAULT_EXCLUDE)):
        if key in options:
            if value != default and options[key] != value:
                raise UserError(f"{key} is given twice with different values ({value!r} and source option "
                                f"{options[key]!r}); give it once")
            continue
        if key in accepted or takes_any:
            options[key] = value
        elif value != default:
            raise UserError(f"--{key.replace('_', '-')} does not apply to source format {name!r} (it takes: {takes})")
    unknown = [k for k in options if k not in accepted] if not takes_any else []
    if unknown:
        raise UserError(f"source format {name!r} has no option {', '.join(map(repr, unknown))} (it takes: {takes})")
    return options


def _assign(kept: list[Kept], items: list[SourceItem], settings: BuildSettings) -> tuple[list[str], dict]:
    """The split of every kept sample: prescribed by the source, else by group. A group with
    prescribed members pulls its unprescribed members along."""
    prescribed: dict[str, Counter] = defaultdict(Counter)
    for k in kept:
        item = items[k.index]
        if item.split is not None:
            prescribed[item.group][item.split] += 1
    free = [(items[k.index].group, items[k.index].label) for k in kept
            if items[k.index].split is None and items[k.index].group not in prescribed]
    split_of_group = assign_splits(free, settings.val_fraction, settings.test_fraction, settings.seed,
                                   stratify=settings.stratify) if free else {}
    for group, counts in prescribed.items():
        split_of_group[group] = min(counts.items(), key=lambda kv: (-kv[1], SPLITS.index(kv[0])))[0]
    splits = [items[k.index].split or split_of_group[items[k.index].group] for k in kept]
    straddling = sorted(g for g, c in prescribed.items() if len(c) > 1)
    info = {
        "prescribed_samples": sum(1 for k in kept if items[k.index].split is not None),
        "group_disjoint": not straddling,
    }
    if straddling:
        info["groups_in_several_prescribed_splits"] = len(straddling)
        info["examples"] = straddling[:5]
    return splits, info


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


def _process(items, order, work: _Work, settings: BuildSettings, workers: int, progress: bool) -> tuple[Selection, dict]:
    """Phase 1: results for the items in `order` (reused where they exist), fed in that
    order to a Selection; stops early once a sample cap is reached."""
    selection = Selection(settings, items)
    item_settings = settings.item_settings()
    n = len(order)
    found = work.count_results()
    if found and progress:
        tqdm.write(f"resuming: {found} finished item(s) in {work.dir} are reused")
    chunk = 1 if workers <= 1 or settings.max_samples else 4
    window = 2 * workers
    records: dict[int, tuple[dict, int, str]] = {}
    pending: dict = {}
    next_pos = frontier = reused = processed = 0
    executor = None
    if workers > 1:
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_worker_init)
    bar = tqdm(total=n, unit="item", desc="process", disable=not progress, dynamic_ncols=True, smoothing=0.05)
    clean = False
    try:
        while True:
            while frontier in records:
                header, base, path = records.pop(frontier)
                selection.feed(order[frontier], header, base, path)
                frontier += 1
            bar.set_postfix(frames=selection.frames, skipped=len(selection.failed),
                            dups=len(selection.duplicates), refresh=False)
            if selection.full or frontier >= n:
                break
            batch: list[tuple[int, str]] = []
            looked = 0
            while next_pos < n and len(pending) < window and not selection.full and looked < 512:
                looked += 1
                pos, next_pos = next_pos, next_pos + 1
                path = work.path_of(items[order[pos]])
                cached = read_result(path)
                if cached is not None:
                    records[pos] = (*cached, str(path))
                    reused += 1
                    bar.update()
                    continue
                batch.append((pos, str(path)))
                if len(batch) == chunk:
                    pending[_submit(executor, items, order, batch, item_settings, records)] = batch
                    batch = []
                    if executor is None:
                        break  # advance the frontier after each item (a cap may be reached)
            if batch:
                pending[_submit(executor, items, order, batch, item_settings, records)] = batch
            if executor is None:
                processed += sum(len(b) for b in pending.values())
                bar.update(sum(len(b) for b in pending.values()))
                pending.clear()
                continue
            if pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    positions = pending.pop(future)
                    for (pos, path), (header, base) in zip(positions, future.result()):
                        records[pos] = (header, base, path)
                    processed += len(positions)
                    bar.update(len(positions))
        clean = True
    except BrokenProcessPool:
        raise UserError(
            f"a worker process died (out of memory? killed?) after {processed + reused} of {n} items; "
            f"rerun the same command to resume (finished work in {work.dir} is kept), perhaps with fewer --workers"
        ) from None
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=clean, cancel_futures=True)
    return selection, {"items_reused": reused, "items_processed": processed, "items_not_read": n - frontier}


def _submit(executor, items, order, batch: list[tuple[int, str]], item_settings, records):
    tasks = [(items[order[pos]], path) for pos, path in batch]
    if executor is None:  # in this process (workers=1): run now
        for (pos, path), (header, base) in zip(batch, _run_batch(tasks, item_settings)):
            records[pos] = (header, base, path)
        return object()
    return executor.submit(_run_batch, tasks, item_settings)


def _pack(out: Path, selection: Selection, splits_of: list[str], items, source, settings, work, progress) -> dict[str, SplitInfo]:
    by_split: dict[str, list[Kept]] = {s: [] for s in SPLITS}
    for kept, split in zip(selection.kept, splits_of):
        by_split[split].append(kept)
    result: dict[str, SplitInfo] = {}
    labelled = list(source.classes)
    with tqdm(total=len(selection.kept), unit="img", desc="pack", disable=not progress, dynamic_ncols=True) as bar:
        for split in SPLITS:
            members = by_split[split]
            members = [members[i] for i in seeded_order([k.key for k in members], settings.seed)]
            info = SplitInfo(class_counts={c: 0 for c in labelled})
            groups = set()
            sink = ShardSink(out, split, settings.shard_size)
            try:
                for kept in members:
                    item = items[kept.index]
                    image_png, region_png, frame_meta = _read_members(kept, work.dir)
                    meta = {**frame_meta, "label": item.label, "class_name": item.class_name, "group": item.group,
                            "source": item.source, "split": split}
                    sink.write(sample_format.assemble_sample(kept.key, image_png, region_png, meta))
                    info.count += 1
                    if item.label < 0:
                        info.unlabelled += 1
                    else:
                        info.class_counts[item.class_name] = info.class_counts.get(item.class_name, 0) + 1
                    groups.add(item.group)
                    bar.update()
                info.shards = sink.close()
            except BaseException:
                sink.abort()
                raise
            info.groups = len(groups)
            result[split] = info
    return result


def _by(entries: list[dict], field_name: str) -> dict[str, int]:
    return dict(sorted(Counter(e[field_name] for e in entries).items()))


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
    source = open_source(name, src, **options)
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
    work = _Work(out, fingerprint, settings.overwrite)
    try:
        selection, run_stats = _process(items, order, work, settings, workers, progress)
        processed = time.perf_counter()
        splits_of, split_info = _assign(selection.kept, items, settings)
        summary = {
            "items": len(items),
            "items_read": selection.items_read,
            "frames": selection.frames,
            "samples": len(selection.kept),
            "skipped": len(selection.failed),
            "skipped_by_stage": _by(selection.failed, "stage"),
            "duplicates": len(selection.duplicates),
            "duplicate_examples": selection.duplicates[:DUPLICATES_IN_MANIFEST],
            "overlay_inpainted": selection.inpainted,
            "overlay_flagged": sum(1 for f in selection.flagged if f["kept"]),
            "overlay_skipped": sum(1 for f in selection.flagged if not f["kept"]),
            "capped": selection.capped,
            "items_not_read": run_stats["items_not_read"],
            "report": REPORT_NAME,
        }
        report = {
            "format": "usjepa-build-report",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "out": str(out),
            "source": {"root": str(source.root), "format": name, "format_detected": settings.format == AUTO,
                       "options": _jsonable(options)},
            "summary": summary,
            "skipped": selection.failed,
            "duplicates": selection.duplicates,
            "overlay_flagged": selection.flagged,
            "run": {"workers": workers, **run_stats},
        }
        if not selection.kept:
            reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in selection.failed[:3])
            atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2) + "\n")
            work.remove()
            raise UserError(
                f"none of the {len(items)} items under {source.root} could be used ({reasons}); every reason is in "
                f"{out / REPORT_NAME}; check the files"
            )
        splits = _pack(out, selection, splits_of, items, source, settings, work, progress)
        _remove_stale(out, {s.name for info in splits.values() for s in info.shards})
        packed = time.perf_counter()
        train_count = splits["train"].count
        manifest = Manifest(
            root=out,
            classes=list(source.classes),
            image_size=settings.image_size,
            splits=splits,
            source_root=str(source.root),
            source_format=name,
            created=report["created"],
            grouping=source.grouping(),
            split_settings={
                "unit": "group",
                "seed": settings.seed,
                "val_fraction": settings.val_fraction,
                "test_fraction": settings.test_fraction,
                "fractions_of": "samples (frames), after failures, duplicates and the cap are left out",
                "stratified_by": "majority class of the group" if settings.stratify else None,
                "method": "groups sorted by seeded sha256 within their class, classes interleaved, "
                "filling test, val, train by cumulative image count (group midpoint); a split the "
                "source prescribes for an item is used as it is",
                **split_info,
            },
            preprocessing={
                "grayscale": "colour input: pixels whose channels differ by more than overlay.tolerance are "
                "colour overlays; inpainted (harmonic fill) when they cover less than overlay.max_fraction "
                "of the image, else flagged (large_overlay); then ITU-R 601-2 luma; >8-bit scaled "
                "linearly to 0-255",
                "overlay": asdict(settings.overlay),
                "large_overlay": settings.large_overlay,
                "image_size": settings.image_size,
                "low_percentile": settings.low_percentile,
                "high_percentile": settings.high_percentile,
                "percentiles_measured": "inside the region, after cropping to its bounding box",
                "resize_mode": settings.resize_mode,
                "interpolation": settings.interpolation,
                "region_interpolation": "nearest",
                "outside_region": 0,
            },
            region_detection=asdict(settings.region),
            source_stats={**source.stats(), "options": _jsonable(options), "format_detected": settings.format == AUTO},
            skipped=selection.failed[:MAX_SKIPPED_LISTED],
            num_skipped=len(selection.failed),
            sample_format={
                "image": sample_format.IMAGE_EXT,
                "region": sample_format.REGION_EXT,
                "meta": sample_format.META_EXT,
                "image_mode": "L (8-bit grayscale)",
                "region_values": "0 outside, 255 inside",
                "meta_keys": [*sample_format.REQUIRED_META, *sample_format.BUILD_META],
                "key": "item key; frames of a multi-frame item: <item key>_f<frame, 5 digits>",
            },
            tool={"name": "usjepa", "version": usjepa.__version__},
            selection={
                "order": "items sorted by sha256 of (seed, 'process', item key); frames in source order",
                "dedup": settings.dedup,
                "dedup_by": "pixel_hash: BLAKE2b-128 of the preprocessed image; the first in the order is kept",
                "max_samples": settings.max_samples,
                "large_overlay": settings.large_overlay,
            },
            build_summary=summary,
            sampling_weight=min(train_count, settings.weight_cap),
            weight_cap=settings.weight_cap,
        )
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


__all__ = ["BuildResult", "BuildSettings", "ItemSettings", "build_shards", "process_item", "run_build",
           "timed_build"]
