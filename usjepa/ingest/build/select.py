"""Phase 2, deciding: which samples are written (failures listed, duplicates dropped, the cap,
large overlays flagged or skipped) and into which split (docs/data.md#splits)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import NamedTuple

from usjepa.ingest.build.splits import assign_splits
from usjepa.ingest.settings import BuildSettings
from usjepa.ingest.sources.base import SourceItem
from usjepa.shardset import sample as sample_format
from usjepa.shardset.manifest import SPLITS


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
                share = f"{entry['color_fraction']:.1%} of the image (>= {self.max_fraction:.0%}; large_overlay=skip)"
                self.failed.append({**where, "stage": "overlay", "reason": f"colour overlays cover {share}"})
                continue
            digest = bytes.fromhex(entry["hash"])
            if self.dedup and digest in self.owner:
                first = self.kept[self.owner[digest]]
                of = {"duplicate_of": self.items[first.index].source, "duplicate_of_key": first.key}
                self.duplicates.append({**where, **of, "pixel_hash": entry["hash"]})
                continue
            if self.full:
                self.capped += 1
                continue
            self.owner[digest] = len(self.kept)
            self.inpainted += bool(entry["inpainted"])
            if entry["flagged"]:
                self.flagged.append({**flagged, "kept": True})
            members = base + entry["offset"], tuple(entry["sizes"]), entry["crc"]
            facts = bool(entry["flagged"]), bool(entry["inpainted"]), float(entry["color_fraction"])
            self.kept.append(Kept(index, key, path, *members, *facts))
        if header["error"]:
            self.failed.append({"source": item.source, "key": item.key, "stage": "read", "reason": header["error"]})


def assign_samples(kept: list[Kept], items: list[SourceItem], settings: BuildSettings) -> tuple[list[str], dict]:
    """The split of every kept sample: prescribed by the source, else by group. A group with
    prescribed members pulls its unprescribed members along."""
    prescribed: dict[str, Counter] = defaultdict(Counter)
    for k in kept:
        item = items[k.index]
        if item.split is not None:
            prescribed[item.group][item.split] += 1
    free = [
        (items[k.index].group, items[k.index].label)
        for k in kept
        if items[k.index].split is None and items[k.index].group not in prescribed
    ]
    split_of_group = assign_splits(
        free, settings.val_fraction, settings.test_fraction, settings.seed, stratify=settings.stratify
    )
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
