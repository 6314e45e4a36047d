"""Phase 2, writing: each split's samples, in a seeded order, into WebDataset tars (byte copies
out of the result files); a tar appears under its final name only when complete."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from pathlib import Path

from tqdm import tqdm

from usjepa.errors import UserError
from usjepa.ingest.build.select import Kept, Selection
from usjepa.ingest.build.splits import seeded_order
from usjepa.ingest.build.workdir import naming
from usjepa.ingest.settings import BuildSettings
from usjepa.ingest.sources.base import SourceItem
from usjepa.shardset import sample as sample_format
from usjepa.shardset.manifest import SPLITS, ShardInfo, SplitInfo

SHARD_PATTERN = re.compile(r"^(train|val|test)-\d{6}\.tar$")
TEMP_PATTERN = re.compile(r"^\.(train|val|test)-\d{6}\.tar\.tmp-\d+$")
TAR_MTIME = 0  # fixed member times: same input + settings -> byte-identical shards


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
        with naming(self.out / self._name):
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
        with naming(self.out / self._name):
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
        # close what is open (the tar stream first, then its file); either may fail to flush on a full
        # disk, which does not matter: the file is deleted
        for part in (self._writer, self._file):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
        self._writer = self._file = self._tmp = None


def _read_members(kept: Kept, work_dir: Path) -> tuple[bytes, bytes, dict]:
    with open(kept.path, "rb") as f:
        f.seek(kept.start)
        data = f.read(sum(kept.sizes))
    if len(data) != sum(kept.sizes) or zlib.crc32(data) != kept.crc:
        Path(kept.path).unlink(missing_ok=True)
        raise UserError(
            f"work file {kept.path} is damaged (sample {kept.key}); it was removed: rerun the same command "
            f"to redo that item (finished work in {work_dir} is kept)"
        )
    a, b, _ = kept.sizes
    return data[:a], data[a : a + b], json.loads(data[a + b :])


def pack_splits(
    out: Path,
    selection: Selection,
    splits_of: list[str],
    items: list[SourceItem],
    classes: list[str],
    settings: BuildSettings,
    work_dir: Path,
    progress: bool,
) -> dict[str, SplitInfo]:
    """Write every split's samples, in a seeded order, into its tars; the SplitInfo of each."""
    by_split: dict[str, list[Kept]] = {s: [] for s in SPLITS}
    for kept, split in zip(selection.kept, splits_of):
        by_split[split].append(kept)
    result: dict[str, SplitInfo] = {}
    labelled = list(classes)
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
                    image_png, region_png, frame_meta = _read_members(kept, work_dir)
                    meta = {
                        **frame_meta,
                        "label": item.label,
                        "class_name": item.class_name,
                        "group": item.group,
                        "source": item.source,
                        "split": split,
                    }
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


def remove_stale(out: Path, keep: set[str]) -> None:
    """Remove tars of an earlier build that this one did not write, and temporary tars."""
    for path in out.iterdir():
        if (SHARD_PATTERN.match(path.name) and path.name not in keep) or TEMP_PATTERN.match(path.name):
            path.unlink(missing_ok=True)
