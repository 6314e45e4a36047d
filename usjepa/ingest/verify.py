"""Check a shard set against its manifest by reading every sample back (docs/data.md#verify-and-inspect)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from webdataset import tariterators

from usjepa.errors import UserError
from usjepa.fileio import files_sha256
from usjepa.ingest.build.pack import SHARD_PATTERN
from usjepa.ingest.build.workdir import WORK_DIR
from usjepa.ingest.image.preprocess import output_shape
from usjepa.shardset.manifest import Manifest, SplitInfo, load_manifest
from usjepa.shardset.sample import BUILD_META, decode_sample

MAX_LISTED = 10


def read_samples(path: Path):
    """Raw samples of one tar (no node/worker splitting, unlike wds.WebDataset)."""
    with open(path, "rb") as stream:
        yield from tariterators.tarfile_samples([{"url": str(path), "stream": stream}])


class _Split:
    """What the samples of one split add up to."""

    def __init__(self):
        self.class_counts: Counter[str] = Counter()
        self.groups: set[str] = set()
        self.decoded = self.unlabelled = self.flagged = self.inpainted = 0


class _Checker:
    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.problems: list[str] = []
        self.keys: set[str] = set()
        self.hashes: dict[str, str] = {}
        self.build_meta = [k for k in BUILD_META if k in manifest.sample_format.get("meta_keys", [])]
        self.dedup = bool(manifest.selection.get("dedup"))
        self.resize_mode = manifest.preprocessing.get("resize_mode", "pad")

    def shard(self, shard, split: str, seen: _Split) -> None:
        path = self.manifest.root / shard.name
        if not path.is_file():
            self.problems.append(f"{shard.name}: file missing")
            return
        if files_sha256([path]) != shard.sha256:
            self.problems.append(f"{shard.name}: sha256 differs from the manifest (file changed or corrupt)")
        n = 0
        try:
            for raw in read_samples(path):
                n += 1
                try:
                    image, region, meta = decode_sample(raw)
                except ValueError as exc:
                    self.problems.append(f"{shard.name}: {exc}")
                    continue
                self.sample(f"{shard.name}: {raw['__key__']}", raw["__key__"], image, region, meta, split, seen)
        except Exception as exc:  # a damaged tar header stops the tar reader
            self.problems.append(f"{shard.name}: unreadable tar after {n} sample(s): {type(exc).__name__}: {exc}")
        if n != shard.count:
            self.problems.append(f"{shard.name}: {n} samples, manifest says {shard.count}")

    def sample(self, where: str, key: str, image, region, meta: dict, split: str, seen: _Split) -> None:
        problems, classes, size = self.problems, self.manifest.classes, self.manifest.image_size
        if key in self.keys:
            problems.append(f"{where.split(':')[0]}: duplicate key {key}")
        self.keys.add(key)
        expected = output_shape(image.shape, size, self.resize_mode)
        if image.shape != expected:
            problems.append(f"{where} is {image.shape}, expected {expected} ({self.resize_mode})")
        if not region.any():
            problems.append(f"{where} has an empty region mask")
        label, name = meta["label"], meta["class_name"]
        if label == -1:
            seen.unlabelled += 1
        elif not (isinstance(label, int) and 0 <= label < len(classes) and classes[label] == name):
            problems.append(f"{where} label {label!r} / class {name!r} disagree with classes {classes}")
        else:
            seen.class_counts[name] += 1
        if meta["split"] != split:
            problems.append(f"{where} says split {meta['split']!r}, shard is {split!r}")
        missing = [k for k in self.build_meta if k not in meta]
        if missing:
            problems.append(f"{where} metadata lacks {missing}")
        digest = meta.get("pixel_hash")
        if self.dedup and digest is not None:
            if digest in self.hashes:
                problems.append(f"{where} has the same pixels as {self.hashes[digest]} (dedup was on)")
            self.hashes[digest] = key
        seen.flagged += bool(meta.get("overlay_flagged"))
        seen.inpainted += bool(meta.get("inpainted"))
        seen.groups.add(str(meta["group"]))
        seen.decoded += 1

    def split(self, split: str, info: SplitInfo, seen: _Split) -> None:
        p = self.problems
        in_shards = sum(s.count for s in info.shards)
        if in_shards != info.count:
            p.append(f"split {split}: shard counts sum to {in_shards}, manifest says {info.count}")
        if seen.decoded != info.count:
            p.append(f"split {split}: decoded {seen.decoded} samples, manifest says {info.count}")
        expected = {c: n for c, n in info.class_counts.items() if n}
        if dict(seen.class_counts) != expected:
            p.append(f"split {split}: class counts {dict(seen.class_counts)} differ from the manifest's {expected}")
        if seen.unlabelled != info.unlabelled:
            p.append(f"split {split}: {seen.unlabelled} unlabelled samples, manifest says {info.unlabelled}")
        if len(seen.groups) != info.groups:
            p.append(f"split {split}: {len(seen.groups)} groups, manifest says {info.groups}")

    def across(self, seen: dict[str, _Split]) -> None:
        m = self.manifest
        if m.split_settings.get("group_disjoint", True):
            names = list(seen)
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    shared = seen[a].groups & seen[b].groups
                    if shared:
                        self.problems.append(f"{len(shared)} group(s) in both {a} and {b}, e.g. {sorted(shared)[:3]}")
        counted = {
            "overlay_flagged": sum(s.flagged for s in seen.values()),
            "overlay_inpainted": sum(s.inpainted for s in seen.values()),
        }
        for field, n in counted.items():
            if field in m.build_summary and m.build_summary[field] != n:
                self.problems.append(
                    f"{n} samples with {field.replace('overlay_', '')} overlays, manifest says {m.build_summary[field]}"
                )
        if m.sampling_weight is not None and m.weight_cap is not None and "train" in m.splits:
            expected = min(m.splits["train"].count, m.weight_cap)
            if m.sampling_weight != expected:
                self.problems.append(
                    f"sampling_weight {m.sampling_weight} is not min(train samples, weight_cap) = {expected}"
                )


def verify_shards(out) -> dict:
    """Decode every sample of the shard set in `out` and compare it with the manifest: checksums
    and counts, image size, region masks, labels, splits, keys, group-disjointness, build fields,
    duplicates, overlay counts and the sampling weight. A report; UserError listing problems."""
    start = time.perf_counter()
    manifest = load_manifest(out)
    check = _Checker(manifest)
    seen: dict[str, _Split] = {}
    for split, info in manifest.splits.items():
        seen[split] = _Split()
        for shard in info.shards:
            check.shard(shard, split, seen[split])
        check.split(split, info, seen[split])
    check.across(seen)
    listed = {s.name for info in manifest.splits.values() for s in info.shards}
    report = {
        "ok": not check.problems,
        "shards_dir": str(manifest.root),
        "samples": sum(s.decoded for s in seen.values()),
        "splits": {
            split: {
                "count": s.decoded,
                "shards": len(manifest.splits[split].shards),
                "groups": len(s.groups),
                "class_counts": dict(s.class_counts),
                "unlabelled": s.unlabelled,
                "overlay_flagged": s.flagged,
                "inpainted": s.inpainted,
            }
            for split, s in seen.items()
        },
        "classes": list(manifest.classes),
        "image_size": manifest.image_size,
        "overlay_flagged": sum(s.flagged for s in seen.values()),
        "inpainted": sum(s.inpainted for s in seen.values()),
        "skipped_at_build": manifest.skipped_count,
        "duplicates_at_build": manifest.build_summary.get("duplicates"),
        "sampling_weight": manifest.sampling_weight,
        "unlisted_shards": sorted(
            p.name
            for p in manifest.root.iterdir()  # not an error: readers go by the manifest
            if SHARD_PATTERN.match(p.name) and p.name not in listed
        ),
        "leftover_work": (manifest.root / WORK_DIR).is_dir(),  # kept with --keep-work; not an error
        "problems": check.problems,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if check.problems:
        problems = check.problems
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        error = UserError(
            f"shard set {manifest.root} failed verification ({len(problems)} problem(s)): "
            + "; ".join(problems[:MAX_LISTED])
            + more
            + "; rebuild it with `usjepa shards build SRC OUT --overwrite`"
        )
        error.report = report
        raise error
    return report
