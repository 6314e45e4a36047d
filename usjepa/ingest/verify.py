"""Check a shard set against its manifest by reading every sample back."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from webdataset import tariterators

from usjepa.errors import UserError
from usjepa.fileio import files_sha256
from usjepa.shardset.manifest import load_manifest
from usjepa.ingest.pack import SHARD_PATTERN
from usjepa.ingest.preprocess import output_shape
from usjepa.shardset.sample import BUILD_META, decode_sample
from usjepa.ingest.workdir import WORK_DIR

MAX_LISTED = 10


def _read_samples(path: Path):
    """Raw samples of one tar (no node/worker splitting, unlike wds.WebDataset)."""
    with open(path, "rb") as stream:
        yield from tariterators.tarfile_samples([{"url": str(path), "stream": stream}])


def verify_shards(out) -> dict:
    """Decode every sample of the shard set in `out` and compare with its manifest.

    Checks: shard files exist with the recorded sha256 and sample count; every sample
    decodes; image is image_size x image_size uint8 grayscale; region mask non-empty and the
    same size; label/class_name agree with the manifest's classes (label -1: unlabelled);
    split recorded in each sample matches its shard; per-split, per-class, unlabelled and
    group counts match; keys unique; no group in two splits (unless the manifest says the
    source prescribed such splits). For shard sets that record them: the per-sample build
    fields are present, no two samples share a pixel hash when the build deduplicated,
    flagged and inpainted overlay counts match the build summary, and sampling_weight is
    min(train samples, weight_cap). Returns a report; raises UserError listing problems.
    """
    start = time.perf_counter()
    manifest = load_manifest(out)
    size, classes = manifest.image_size, manifest.classes
    resize_mode = manifest.preprocessing.get("resize_mode", "pad")
    problems: list[str] = []
    keys: set[str] = set()
    hashes: dict[str, str] = {}
    build_meta = [k for k in BUILD_META if k in manifest.sample_format.get("meta_keys", [])]
    dedup = bool(manifest.selection.get("dedup"))
    totals: Counter[str] = Counter()
    groups_by_split: dict[str, set[str]] = {}
    report_splits = {}
    for split, info in manifest.splits.items():
        class_counts: Counter[str] = Counter()
        groups: set[str] = set()
        decoded = unlabelled = flagged = inpainted = 0
        for shard in info.shards:
            path = manifest.root / shard.name
            if not path.is_file():
                problems.append(f"{shard.name}: file missing")
                continue
            if files_sha256([path]) != shard.sha256:
                problems.append(f"{shard.name}: sha256 differs from the manifest (file changed or corrupt)")
            n = 0
            try:
                for raw in _read_samples(path):
                    n += 1
                    try:
                        image, region, meta = decode_sample(raw)
                    except ValueError as exc:
                        problems.append(f"{shard.name}: {exc}")
                        continue
                    key = raw["__key__"]
                    if key in keys:
                        problems.append(f"{shard.name}: duplicate key {key}")
                    keys.add(key)
                    if image.shape != output_shape(image.shape, size, resize_mode):
                        problems.append(f"{shard.name}: {key} is {image.shape}, expected "
                                        f"{output_shape(image.shape, size, resize_mode)} ({resize_mode})")
                    if not region.any():
                        problems.append(f"{shard.name}: {key} has an empty region mask")
                    label, name = meta["label"], meta["class_name"]
                    if label == -1:
                        unlabelled += 1
                    elif not (isinstance(label, int) and 0 <= label < len(classes) and classes[label] == name):
                        problems.append(f"{shard.name}: {key} label {label!r} / class {name!r} disagree with classes {classes}")
                    else:
                        class_counts[name] += 1
                    if meta["split"] != split:
                        problems.append(f"{shard.name}: {key} says split {meta['split']!r}, shard is {split!r}")
                    missing = [k for k in build_meta if k not in meta]
                    if missing:
                        problems.append(f"{shard.name}: {key} metadata lacks {missing}")
                    digest = meta.get("pixel_hash")
                    if dedup and digest is not None:
                        if digest in hashes:
                            problems.append(f"{shard.name}: {key} has the same pixels as {hashes[digest]} (dedup was on)")
                        hashes[digest] = key
                    flagged += bool(meta.get("overlay_flagged"))
                    inpainted += bool(meta.get("inpainted"))
                    groups.add(str(meta["group"]))
                    decoded += 1
            except Exception as exc:  # a damaged tar header stops the tar reader
                problems.append(f"{shard.name}: unreadable tar after {n} sample(s): {type(exc).__name__}: {exc}")
            if n != shard.count:
                problems.append(f"{shard.name}: {n} samples, manifest says {shard.count}")
        if sum(s.count for s in info.shards) != info.count:
            problems.append(f"split {split}: shard counts sum to {sum(s.count for s in info.shards)}, manifest says {info.count}")
        if decoded != info.count:
            problems.append(f"split {split}: decoded {decoded} samples, manifest says {info.count}")
        expected = {c: n for c, n in info.class_counts.items() if n}
        if dict(class_counts) != expected:
            problems.append(f"split {split}: class counts {dict(class_counts)} differ from the manifest's {expected}")
        if unlabelled != info.unlabelled:
            problems.append(f"split {split}: {unlabelled} unlabelled samples, manifest says {info.unlabelled}")
        if len(groups) != info.groups:
            problems.append(f"split {split}: {len(groups)} groups, manifest says {info.groups}")
        groups_by_split[split] = groups
        totals.update(flagged=flagged, inpainted=inpainted)
        report_splits[split] = {"count": decoded, "shards": len(info.shards), "groups": len(groups),
                                "class_counts": dict(class_counts), "unlabelled": unlabelled,
                                "overlay_flagged": flagged, "inpainted": inpainted}
    if manifest.split_settings.get("group_disjoint", True):
        names = list(groups_by_split)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                shared = groups_by_split[a] & groups_by_split[b]
                if shared:
                    problems.append(f"{len(shared)} group(s) in both {a} and {b}, e.g. {sorted(shared)[:3]}")
    summary = manifest.build_summary
    for field, counted in (("overlay_flagged", totals["flagged"]), ("overlay_inpainted", totals["inpainted"])):
        if field in summary and summary[field] != counted:
            problems.append(f"{counted} samples with {field.replace('overlay_', '')} overlays, manifest says {summary[field]}")
    if manifest.sampling_weight is not None and manifest.weight_cap is not None and "train" in manifest.splits:
        expected_weight = min(manifest.splits["train"].count, manifest.weight_cap)
        if manifest.sampling_weight != expected_weight:
            problems.append(f"sampling_weight {manifest.sampling_weight} is not min(train samples, weight_cap) = {expected_weight}")
    listed = {s.name for info in manifest.splits.values() for s in info.shards}
    strays = sorted(p.name for p in manifest.root.iterdir() if SHARD_PATTERN.match(p.name) and p.name not in listed)
    report = {
        "ok": not problems,
        "shards_dir": str(manifest.root),
        "samples": sum(r["count"] for r in report_splits.values()),
        "splits": report_splits,
        "classes": list(classes),
        "image_size": size,
        "overlay_flagged": totals["flagged"],
        "inpainted": totals["inpainted"],
        "skipped_at_build": manifest.skipped_count,
        "duplicates_at_build": summary.get("duplicates"),
        "sampling_weight": manifest.sampling_weight,
        "unlisted_shards": strays,  # not an error: readers go by the manifest
        "leftover_work": (manifest.root / WORK_DIR).is_dir(),  # kept with --keep-work; not an error
        "problems": problems,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if problems:
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
