"""What a build records about itself: the summary, the build report (everything left out, how
the run went) and the manifest, written last (docs/data.md#manifest)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path

import usjepa
from usjepa.ingest.build.select import Selection
from usjepa.ingest.settings import BuildSettings
from usjepa.shardset import sample as sample_format
from usjepa.shardset.manifest import MAX_SKIPPED_LISTED, REPORT_NAME, Manifest, SplitInfo

DUPLICATES_IN_MANIFEST = 10


def describe_source(source, format_name: str, detected: bool, options: dict) -> dict:
    """The source as the build report and the manifest record it. The root: the source's
    `pseudonymised_root` where it offers one (DICOM: its folder name, identifiers replaced);
    else, for DICOM, no root at all (a folder named after a patient would put an identifier
    into the shard set); else the path itself. `options`: JSON-ready."""
    root = getattr(source, "pseudonymised_root", None)
    if root is None and format_name != "dicom":
        root = source.root
    return {
        **({} if root is None else {"root": str(root)}),
        "format": format_name,
        "format_detected": detected,
        "options": options,
    }


def summarise(n_items: int, selection: Selection, items_not_read: int) -> dict:
    """The build's counts (the report's and the manifest's `build_summary`)."""
    return {
        "items": n_items,
        "items_read": selection.items_read,
        "frames": selection.frames,
        "samples": len(selection.kept),
        "skipped": len(selection.failed),
        "skipped_by_stage": dict(sorted(Counter(f["stage"] for f in selection.failed).items())),
        "duplicates": len(selection.duplicates),
        "duplicate_examples": selection.duplicates[:DUPLICATES_IN_MANIFEST],
        "overlay_inpainted": selection.inpainted,
        "overlay_flagged": sum(1 for f in selection.flagged if f["kept"]),
        "overlay_skipped": sum(1 for f in selection.flagged if not f["kept"]),
        "capped": selection.capped,
        "items_not_read": items_not_read,
        "report": REPORT_NAME,
    }


def make_report(out: Path, created: str, described: dict, summary: dict, selection: Selection, run: dict) -> dict:
    """The build report; `described` is the source as recorded (root, format, options)."""
    return {
        "format": "usjepa-build-report",
        "created": created,
        "out": str(out),
        "source": described,
        "summary": summary,
        "skipped": selection.failed,
        "duplicates": selection.duplicates,
        "overlay_flagged": selection.flagged,
        "run": run,
    }


def make_manifest(
    out: Path,
    source,
    described: dict,
    settings: BuildSettings,
    splits: dict[str, SplitInfo],
    split_info: dict,
    selection: Selection,
    summary: dict,
    created: str,
) -> Manifest:
    """The manifest of the shard set written into `out`."""
    return Manifest(
        root=out,
        classes=list(source.classes),
        image_size=settings.image_size,
        splits=splits,
        source_root=described.get("root"),
        source_format=described["format"],
        created=created,
        grouping=source.grouping(),
        split_settings=_split_settings(settings, split_info),
        preprocessing=_preprocessing(settings),
        region_detection=asdict(settings.region),
        source_stats={
            **source.stats(),
            "options": described["options"],
            "format_detected": described["format_detected"],
        },
        skipped=selection.failed[:MAX_SKIPPED_LISTED],
        num_skipped=len(selection.failed),
        sample_format=dict(SAMPLE_FORMAT),
        tool={"name": "usjepa", "version": usjepa.__version__},
        selection={
            "order": "items sorted by sha256 of (seed, 'process', item key); frames in source order",
            "dedup": settings.dedup,
            "dedup_by": "pixel_hash: BLAKE2b-128 of the preprocessed image; the first in the order is kept",
            "max_samples": settings.max_samples,
            "large_overlay": settings.large_overlay,
        },
        build_summary=summary,
        sampling_weight=min(splits["train"].count, settings.weight_cap),
        weight_cap=settings.weight_cap,
    )


SAMPLE_FORMAT = {
    "image": sample_format.IMAGE_EXT,
    "region": sample_format.REGION_EXT,
    "meta": sample_format.META_EXT,
    "image_mode": "L (8-bit grayscale)",
    "region_values": "0 outside, 255 inside",
    "meta_keys": [*sample_format.REQUIRED_META, *sample_format.BUILD_META],
    "key": "item key; frames of a multi-frame item: <item key>_f<frame, 5 digits>",
}


def _split_settings(settings: BuildSettings, split_info: dict) -> dict:
    return {
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
    }


def _preprocessing(settings: BuildSettings) -> dict:
    return {
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
    }
