"""Build a shard set: source -> split -> preprocess -> WebDataset tars -> manifest (last).

Each tar is written under a hidden temporary name and renamed when complete; the manifest
is written after every shard, so a crashed build never looks finished. Per image the work
is `process_item` (load, preprocess, encode), a pure function of the item and the
settings, so a later change can run it in worker processes (`map` -> `Pool.imap`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

import usjepa
from usjepa.errors import UserError
from usjepa.ingest import sample_format
from usjepa.ingest.manifest import MANIFEST_NAME, SPLITS, Manifest, ShardInfo, SplitInfo, write_manifest
from usjepa.ingest.preprocess import INTERPOLATIONS, RESIZE_MODES, PreprocessError, PreprocessSettings, preprocess
from usjepa.ingest.region import RegionSettings
from usjepa.ingest.sources import DEFAULT_EXCLUDE, SOURCES, SourceItem, open_source
from usjepa.ingest.splits import assign_splits, seeded_order

SHARD_PATTERN = re.compile(r"^(train|val|test)-\d{6}\.tar$")
TEMP_PATTERN = re.compile(r"^\.(train|val|test)-\d{6}\.tar\.tmp-\d+$")
TAR_MTIME = 0  # fixed member times: same input + settings -> byte-identical shards


@dataclass
class BuildSettings:
    image_size: int = 224
    shard_size: int = 1000
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    group_pattern: str | None = None
    overwrite: bool = False
    format: str = "imagefolder"
    exclude_pattern: str | None = DEFAULT_EXCLUDE
    stratify: bool = True
    low_percentile: float = 2.0
    high_percentile: float = 98.0
    resize_mode: str = "pad"
    interpolation: str = "bicubic"
    region: RegionSettings = field(default_factory=RegionSettings)

    def preprocess_settings(self) -> PreprocessSettings:
        return PreprocessSettings(
            image_size=self.image_size,
            low_percentile=self.low_percentile,
            high_percentile=self.high_percentile,
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
            region=self.region,
        )

    def validate(self) -> None:
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
        if self.format not in SOURCES:
            problems.append(f"source format {self.format!r} is not one of {', '.join(sorted(SOURCES))}")
        if problems:
            raise UserError("invalid shard build settings: " + "; ".join(problems))


def process_item(item: SourceItem, settings: PreprocessSettings, split: str) -> tuple[dict | None, str | None]:
    """Load, preprocess and encode one item: (sample, None), or (None, reason) to skip it.

    Unreadable files of any kind are skipped; preprocessing skips only via PreprocessError
    (anything else there is a bug and propagates)."""
    try:
        loaded = item.load()
    except Exception as exc:  # corrupt, truncated, unsupported: never stop the build
        return None, f"unreadable: {type(exc).__name__}: {exc}"
    try:
        out = preprocess(loaded.image, settings, loaded.region)
    except PreprocessError as exc:
        return None, str(exc)
    meta = {
        "label": item.label,
        "class_name": item.class_name,
        "group": item.group,
        "source": item.source,
        "split": split,
        **(loaded.info or {}),
        **out.info,
    }
    return sample_format.encode_sample(item.key, out.image, out.region, meta), None


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
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME, user="usjepa", group="usjepa")
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


def build_shards(src, out, settings: BuildSettings | None = None, progress: bool = True) -> Manifest:
    """Build the shard set for the images under `src` into `out`; returns its manifest."""
    settings = settings or BuildSettings()
    settings.validate()
    out = Path(out).expanduser().absolute()
    source = open_source(
        settings.format, src, group_pattern=settings.group_pattern, exclude_pattern=settings.exclude_pattern
    )
    items = list(source)
    duplicates = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if duplicates:  # a source bug, not a user mistake
        raise RuntimeError(f"source {settings.format} produced duplicate keys, e.g. {duplicates[:3]}")
    split_of_group = assign_splits(
        ((it.group, it.label) for it in items),
        settings.val_fraction,
        settings.test_fraction,
        settings.seed,
        stratify=settings.stratify,
    )
    _prepare_out(out, settings.overwrite)

    pp = settings.preprocess_settings()
    splits: dict[str, SplitInfo] = {}
    skipped: list[dict] = []
    with tqdm(total=len(items), unit="img", desc="shards", disable=not progress, dynamic_ncols=True) as bar:
        for split in SPLITS:
            members = [it for it in items if split_of_group[it.group] == split]
            members = [members[i] for i in seeded_order([it.key for it in members], settings.seed)]
            info = SplitInfo(class_counts={c: 0 for c in source.classes})
            groups = set()
            sink = ShardSink(out, split, settings.shard_size)
            try:
                for item, (sample, reason) in zip(members, map(partial(process_item, settings=pp, split=split), members)):
                    if sample is None:
                        skipped.append({"source": item.source, "split": split, "reason": reason})
                        bar.set_postfix(skipped=len(skipped), refresh=False)
                    else:
                        sink.write(sample)
                        info.count += 1
                        info.class_counts[item.class_name] += 1
                        groups.add(item.group)
                    bar.update()
                info.shards = sink.close()
            except BaseException:
                sink.abort()
                raise
            info.groups = len(groups)
            splits[split] = info

    _remove_stale(out, {s.name for info in splits.values() for s in info.shards})
    if not any(info.count for info in splits.values()):
        reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in skipped[:3])
        raise UserError(f"none of the {len(items)} images under {source.root} could be used ({reasons}); check the files")
    manifest = Manifest(
        root=out,
        classes=list(source.classes),
        image_size=settings.image_size,
        splits=splits,
        source_root=str(source.root),
        source_format=settings.format,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        grouping=source.grouping(),
        split_settings={
            "unit": "group",
            "seed": settings.seed,
            "val_fraction": settings.val_fraction,
            "test_fraction": settings.test_fraction,
            "stratified_by": "majority class of the group" if settings.stratify else None,
            "method": "groups sorted by seeded sha256 within their class, classes interleaved, "
            "filling test, val, train by cumulative image count (group midpoint)",
        },
        preprocessing={
            "grayscale": "ITU-R 601-2 luma for colour input; >8-bit scaled linearly to 0-255",
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
        source_stats=source.stats(),
        skipped=skipped,
        sample_format={
            "image": sample_format.IMAGE_EXT,
            "region": sample_format.REGION_EXT,
            "meta": sample_format.META_EXT,
            "image_mode": "L (8-bit grayscale)",
            "region_values": "0 outside, 255 inside",
            "meta_keys": list(sample_format.REQUIRED_META),
        },
        tool={"name": "usjepa", "version": usjepa.__version__},
    )
    write_manifest(manifest)
    return manifest


def timed_build(src, out, settings: BuildSettings, progress: bool = True) -> tuple[Manifest, float]:
    """`build_shards` plus its wall time in seconds (the manifest itself holds no timings,
    so two builds of the same input compare equal apart from `created`)."""
    start = time.perf_counter()
    manifest = build_shards(src, out, settings, progress)
    return manifest, time.perf_counter() - start
