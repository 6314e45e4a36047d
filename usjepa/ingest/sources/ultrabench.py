"""UltraBench source: the processed layout the `ultrabench` package writes (images/, masks/scan/,
split JSON files); splits as published, scan masks as regions (docs/data.md#sources, "ultrabench")."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from usjepa.errors import UserError
from usjepa.ingest.build.splits import assign_splits
from usjepa.ingest.sources.base import (
    UNLABELLED,
    Loaded,
    Patterns,
    Source,
    SourceItem,
    check_folder,
    label_indices,
    register_source,
)
from usjepa.ingest.sources.imagefile import load_image
from usjepa.ingest.sources.listed import DirIndex, relative_to_any, require_some_exist
from usjepa.ingest.sources.walk import IMAGE_SUFFIXES
from usjepa.shardset.sample import make_key

# The keys the published ultrabench layouts write, per role (POCUS records name their video in
# `source`); a split file is a list of records, {"records" | "data": [...]}, or a mapping image -> record
# or label (docs/data.md#ultrabench).
LIST_KEYS = ("records", "data")
IMAGE_KEYS = ("image", "file_name")
LABEL_KEYS = ("label",)
NAME_KEYS = ("class", "pathology")
GROUP_KEYS = ("patient", "source")
MASK_KEYS = ("scan_mask",)
LAYOUT = (
    "an UltraBench dataset folder holds images/, masks/scan/ and train.json + validation.json + test.json "
    "(release 1.0.1) or train_val.json + test.json"
)


def load_mask(path: Path) -> np.ndarray:
    """A mask file as bool HxW: nonzero (in any colour channel) is inside."""
    with Image.open(path) as img:
        img.load()
        arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[2] == 2 else arr[..., :3].max(axis=-1)  # LA: luminance only
    return arr > 0


@dataclass(frozen=True)
class ScanMaskItem(SourceItem):
    """An image file plus, when the layout has one, its scan (region) mask file."""

    path: Path = field(default=Path(), compare=False)
    mask_path: Path | None = field(default=None, compare=False)

    def load(self) -> Loaded:
        image, info = load_image(self.path)  # grayscale, or RGB when it has colour (the writer converts)
        if self.mask_path is None:
            info["scan_mask"] = "none"
            return Loaded(image, None, info)
        region = load_mask(self.mask_path)
        if region.shape != image.shape[:2]:
            raise ValueError(
                f"scan mask {self.mask_path.name} is {region.shape[1]}x{region.shape[0]} but the image "
                f"is {image.shape[1]}x{image.shape[0]}"
            )
        if not region.any():
            info["scan_mask"] = "empty"
            return Loaded(image, None, info)
        info["scan_mask"] = "file"
        return Loaded(image, region, info)


def _first(record: dict, keys) -> tuple[str | None, object]:
    for key in keys:
        if key in record and record[key] is not None and record[key] != "":
            return key, record[key]
    return None, None


def _as_int(value) -> int | None:
    """An integral label (1, 1.0, "1", true) as int; None for anything else."""
    if isinstance(value, int):
        return int(value)
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def read_records(path: Path) -> list[dict]:
    """The records of one split file, in any of the accepted shapes (module docstring)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix or regenerate the file"
        ) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc}); regenerate it") from None
    if isinstance(data, dict):
        for key in LIST_KEYS:
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            if data and all(isinstance(v, dict) for v in data.values()):
                data = [{"image": k, **v} if _first(v, IMAGE_KEYS)[0] is None else v for k, v in data.items()]
            elif data and all(not isinstance(v, (dict, list)) for v in data.values()):
                data = [{"image": k, "label": v} for k, v in data.items()]
            else:
                raise UserError(
                    f"{path} is a JSON object without a list of records (looked for {', '.join(LIST_KEYS)}; it has "
                    f"{', '.join(list(map(str, data))[:10]) or 'no keys'}); expected a list of records, one per image"
                )
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}; expected a list of records, one per image")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise UserError(
                f"{path} record {i} is a {type(record).__name__} ({str(record)[:60]!r}); expected an "
                "object with an image path and a label"
            )
    return data


def _fields(record: dict) -> dict:
    """The record's integer label and class name (where it has them), group and scan mask."""
    label_key, label_value = _first(record, LABEL_KEYS)
    name_key, name_value = _first(record, NAME_KEYS)
    number = _as_int(label_value) if label_key is not None else None
    name = None
    if name_key is not None:
        name = str(name_value).strip()
    elif label_key is not None and number is None:
        name = str(label_value).strip()  # a class name stored under "label"
    _, group = _first(record, GROUP_KEYS)
    _, mask = _first(record, MASK_KEYS)
    group, mask = None if group is None else str(group), mask if isinstance(mask, str) else None
    return {"number": number, "name": name, "group": group, "mask": mask}


def _groups_in_several_splits(items) -> int:
    splits_of: dict[str, set] = {}
    for it in items:
        splits_of.setdefault(it.group, set()).add(it.split)
    return sum(len(splits) > 1 for splits in splits_of.values())


@register_source("ultrabench")
class UltraBenchSource(Source):
    """An UltraBench dataset folder (see the module docstring for the layout and shapes)."""

    looks_for: ClassVar[str] = (
        "an UltraBench dataset folder: images/ plus train.json + validation.json + test.json "
        "or train_val.json + test.json"
    )

    # what each option means: docs/data.md#ultrabench
    @dataclass(frozen=True)
    class Options:
        val_fraction: float = 0.1
        seed: int = 0
        scan_masks: bool = True
        group_pattern: str | None = None
        exclude_pattern: str | None = None

    def scan(self):
        if not 0 <= self.options.val_fraction < 1:
            raise UserError(f"val_fraction {self.options.val_fraction} must be in [0, 1)")
        self.patterns = Patterns(self.options.group_pattern, self.options.exclude_pattern)
        self.variant, self.files = self._split_files()
        index = DirIndex()
        rows, excluded = self._rows(index)
        classes, label_of_row = self._labels(rows, any(r["number"] is not None or r["name"] is not None for r in rows))
        for r in rows:
            r["rel"] = relative_to_any(r["path"], self.root)
            if r["group"] is None:
                r["group"] = self.patterns.group(r["rel"], r["path"], f"{r['where']}: image")
        return self._items_of(rows, index, classes, label_of_row, excluded)

    # -- layout
    def _split_files(self) -> tuple[str, dict[str, Path]]:
        root = self.root
        check_folder(root, LAYOUT, what="UltraBench source")
        names = ("train_val.json", "train.json", "validation.json", "test.json")
        train_val, train, val, test = (root / n if (root / n).is_file() else None for n in names)
        jsons = ", ".join(sorted(p.name for p in root.glob("*.json"))) or "none"
        if test is None or (train_val is None and train is None):
            raise UserError(f"no UltraBench split files in {root} (JSON files there: {jsons}); {LAYOUT}")
        if train_val is not None and (train is not None or val is not None):
            raise UserError(
                f"{root} holds both {train_val.name} and train/validation files (JSON files: {jsons}); keep one layout"
            )
        if train_val is not None:
            return "train_val+test", {"train_val": train_val, "test": test}
        if val is None:
            return "train+test", {"train_val": train, "test": test}
        return "train+validation+test", {"train": train, "val": val, "test": test}

    # -- listing
    def _resolve_image(self, raw: str, index: DirIndex) -> Path:
        raw = raw.replace("\\", "/")
        path = Path(raw).expanduser()
        if path.is_absolute():
            return path
        direct = self.root / path
        if not index.exists(direct) and len(path.parts) == 1 and index.exists(self.root / "images" / path):
            return self.root / "images" / path
        return direct

    def _find_mask(self, raw: str | None, image: Path, index: DirIndex) -> Path | None:
        if raw:
            path = self.root / Path(str(raw).replace("\\", "/"))
            if index.exists(path):
                return path
        folder = self.root / "masks" / "scan"
        if image.name in index.names(folder):
            return folder / image.name
        matches = index.by_stem(folder, image.stem, IMAGE_SUFFIXES)
        if matches:
            return folder / min(matches, key=lambda n: (not n.lower().endswith(".png"), n))
        return None

    def _rows(self, index: DirIndex) -> tuple[list[dict], int]:
        """Every record of the split files as a row (split key, where, path, label number and name, group, mask)."""
        rows: list[dict] = []
        seen: dict[Path, str] = {}
        excluded = 0
        for split_key, path in self.files.items():
            for i, record in enumerate(read_records(path)):
                where = f"{path.name} record {i}"
                image_key, raw = _first(record, IMAGE_KEYS)
                if image_key is None or not isinstance(raw, str):
                    raise UserError(
                        f"{self.root / path.name} record {i} has no image path (looked for {', '.join(IMAGE_KEYS)}); "
                        f"it has keys: {', '.join(map(str, record)) or 'none'}; fix the split file"
                    )
                image = self._resolve_image(raw, index)
                if self.patterns.excludes(image):
                    excluded += 1
                    continue
                if image in seen:
                    raise UserError(
                        f"{raw!r} is listed twice in {self.root} ({seen[image]} and {where}); each image "
                        "may be in one split only: fix the split files"
                    )
                seen[image] = where
                rows.append(
                    {
                        "split_key": split_key,
                        "where": where,
                        "file": path,
                        "index": i,
                        "keys": list(record),
                        "raw": raw,
                        "path": image,
                        **_fields(record),
                    }
                )
        if not rows:
            raise UserError(
                f"the split files of {self.root} list no images (or all were excluded by "
                f"'{self.options.exclude_pattern}'); regenerate the dataset with ultrabench"
            )
        return rows, excluded

    def _items_of(self, rows: list[dict], index: DirIndex, classes: list[str], label_of_row: dict, excluded: int):
        exists = [index.exists(r["path"]) for r in rows]
        require_some_exist(
            [r["path"] for r in rows],
            exists,
            f"the split files of {self.root}",
            "image paths are read relative to the dataset folder (or its images/ folder); point SRC at "
            "the folder that holds images/ and the JSON files",
        )
        train_val = [(r["group"], label_of_row[id(r)]) for r in rows if r["split_key"] == "train_val"]
        val_of_group = assign_splits(train_val, self.options.val_fraction, 0.0, self.options.seed)
        items: list[ScanMaskItem] = []
        for r in rows:
            split = val_of_group[r["group"]] if r["split_key"] == "train_val" else r["split_key"]
            mask = self._find_mask(r["mask"], r["path"], index) if self.options.scan_masks else None
            label = label_of_row[id(r)]
            items.append(
                ScanMaskItem(
                    key=make_key(r["rel"]),
                    source=r["rel"],
                    label=label,
                    class_name=classes[label] if label >= 0 else UNLABELLED,
                    group=r["group"],
                    split=split,
                    path=r["path"],
                    mask_path=mask,
                )
            )
        missing = [r["rel"] for r, ok in zip(rows, exists) if not ok]
        masks_found = sum(it.mask_path is not None for it in items)
        stats = {
            "layout": self.variant,
            "split_files": {k: p.name for k, p in self.files.items()},
            "images_listed": len(items),
            "per_split": dict(sorted(Counter(it.split for it in items).items())),
            "missing_files": len(missing),
            "missing_examples": missing[:10],
            "scan_masks_found": masks_found,
            "scan_masks_missing": len(items) - masks_found if self.options.scan_masks else None,
            "excluded": excluded,
            "exclude_pattern": self.options.exclude_pattern,
            "groups_in_several_splits": _groups_in_several_splits(items),
        }
        return items, stats, classes

    def _labels(self, rows: list[dict], any_label: bool) -> tuple[list[str], dict[int, int]]:
        """(classes, id(row) -> label index); see the module docstring for the rules."""
        if not any_label:
            return [], {id(r): -1 for r in rows}
        for r in rows:
            if r["number"] is None and r["name"] is None:
                raise UserError(
                    f"{r['file']} record {r['index']} has no label (looked for {', '.join(LABEL_KEYS + NAME_KEYS)}); "
                    f"it has keys: {', '.join(r['keys'])}; fix the split file"
                )
        name_of_number: dict[int, str] = {}
        for r in rows:
            if r["number"] is not None and r["name"] is not None:
                known = name_of_number.setdefault(r["number"], r["name"])
                if known != r["name"]:
                    raise UserError(
                        f"label {r['number']} is class {known!r} in one record and {r['name']!r} in "
                        f"{r['where']}; the split files disagree: regenerate them"
                    )
        numbers = {r["number"] for r in rows if r["number"] is not None}
        if numbers:
            number_of_name = {v: k for k, v in name_of_number.items()}
            for r in rows:
                if r["number"] is None:
                    if r["name"] not in number_of_name:
                        raise UserError(
                            f"{r['where']} has class {r['name']!r} but no integer label, and no other "
                            "record gives that class a label; fix the split files"
                        )
                    r["number"] = number_of_name[r["name"]]
            ordered = sorted(numbers | set(name_of_number))
            classes = [name_of_number.get(n, str(n)) for n in ordered]
            if len(set(classes)) != len(classes):
                raise UserError(f"two integer labels share a class name ({classes}); fix the split files")
            index = label_indices(ordered)
            return classes, {id(r): index[r["number"]] for r in rows}
        classes = sorted({r["name"] for r in rows})
        index = label_indices(classes)
        return classes, {id(r): index[r["name"]] for r in rows}

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        root = Path(root)
        has_train = (root / "train_val.json").is_file() or (root / "train.json").is_file()
        return (root / "images").is_dir() and (root / "test.json").is_file() and has_train

    def grouping(self) -> dict:
        keys = "record key (" + ", ".join(GROUP_KEYS) + ")"
        out = {
            "mode": "ultrabench",
            "prescribed_splits": self.variant,
            "group": keys
            if self.patterns.group_rx is None
            else f"{keys}, else pattern {self.options.group_pattern} on the image stem",
            "without_group": "each image is its own group" if self.patterns.group_rx is None else None,
        }
        if "train_val" in self.files:
            out["val_from_train"] = {
                "file": self.files["train_val"].name,
                "val_fraction": self.options.val_fraction,
                "seed": self.options.seed,
                "method": "usjepa.ingest.build.splits.assign_splits by group, stratified by majority class",
            }
        return out
