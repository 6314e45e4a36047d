"""CSV source: one row per image or video; the columns are options with one plain default each,
never guessed (docs/data.md#sources, "csv")."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from usjepa.errors import UserError
from usjepa.ingest.sources.base import (
    UNLABELLED,
    Patterns,
    Source,
    SourceItem,
    capture,
    compile_pattern,
    label_indices,
    register_source,
)
from usjepa.ingest.sources.listed import (
    DirIndex,
    MediaItems,
    canonical_labels,
    has_media_suffix,
    is_listed_video,
    relative_to_any,
    require_some_exist,
)
from usjepa.ingest.sources.walk import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from usjepa.shardset.sample import make_key

ROLES = ("path", "label", "group", "split")
_SPELLINGS = {"train": "train training trn", "val": "val valid validation dev", "test": "test testing tst"}
SPLIT_NAMES = {name: split for split, names in _SPELLINGS.items() for name in names.split()}


def normalize_split(value: str) -> str | None:
    """'Training' -> 'train', 'VALID' -> 'val', ...; None when not a known split name."""
    return SPLIT_NAMES.get(str(value).strip().lower())


def _norm_column(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


@register_source("csv")
class CsvSource(Source):
    """A CSV manifest given as the file itself, or a folder holding exactly one .csv file."""

    # what each option means: docs/data.md#csv
    @dataclass(frozen=True)
    class Options:
        path_column: str = "path"
        label_column: str | None = "label"
        group_column: str | None = "patient"
        split_column: str | None = "split"
        path_root: str | None = None
        path_suffix: str | None = None
        group_pattern: str | None = None
        label_pattern: str | None = None
        exclude_pattern: str | None = None
        delimiter: str | None = None
        fps: float | None = None
        max_frames: int | None = None

    looks_for: ClassVar[str] = "a CSV manifest given as the .csv file itself, with a path column"

    def __init__(self, root, **options):
        self.csv_path = self._find_csv(Path(root).expanduser().absolute())
        super().__init__(self.csv_path.parent, **options)  # sources are recorded relative to the CSV's folder

    def scan(self):
        o = self.options
        self.path_root = self.root
        if o.path_root:
            self.path_root = (self.root / Path(o.path_root).expanduser()).absolute()
            if not self.path_root.is_dir():
                raise UserError(
                    f"path_root {o.path_root!r} ({self.path_root}) is not a folder; give the folder the "
                    "CSV's paths are relative to (relative to the CSV's folder, or absolute)"
                )
        self.path_suffix = o.path_suffix if not o.path_suffix or o.path_suffix.startswith(".") else "." + o.path_suffix
        self.patterns = Patterns(o.group_pattern, o.exclude_pattern)
        self._label_rx = compile_pattern(o.label_pattern, "label pattern", need_group=True)
        self._media = MediaItems(o.fps, o.max_frames)
        header, rows = self._read()
        self.columns = {role: self._column(header, role) for role in ROLES}
        listed, excluded = self._listed(header, rows)
        return self._items_of(header, rows, listed, excluded)

    @staticmethod
    def _find_csv(root: Path) -> Path:
        how = "give the CSV file itself, or a folder that holds exactly one .csv file"
        if not root.exists():
            raise UserError(f"CSV source {root} does not exist; check the path ({how})")
        if root.is_file():
            return root
        found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise UserError(f"folder {root} holds {len(found)} CSV files ({names}); {how}")
        return found[0]

    def _read(self) -> tuple[list[str], list[tuple[int, list[str]]]]:
        try:
            text = self.csv_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UserError(f"{self.csv_path} is not UTF-8 text ({exc}); save the CSV as UTF-8") from None
        delimiter = self.options.delimiter
        if delimiter is None:
            try:
                delimiter = csv.Sniffer().sniff(text[:65536].split("\n", 1)[0], delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = ","
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader)]
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
        except StopIteration:
            raise UserError(f"{self.csv_path} is empty; it needs a header row and one row per file") from None
        except csv.Error as exc:
            raise UserError(f"{self.csv_path} line {reader.line_num} is not valid CSV ({exc}); fix the file") from None
        if not rows:
            raise UserError(f"{self.csv_path} has a header ({', '.join(header)}) but no rows; list one file per row")
        return header, rows

    def _column(self, header: list[str], role: str) -> int | None:
        """Index of the column the `<role>_column` option names (exact, else ignoring case and
        punctuation); None when the option is null, or is its default and the CSV lacks it."""
        option = f"{role}_column"
        given = getattr(self.options, option)
        if role == "label" and self.options.label_pattern is not None:
            if given not in (None, _default(option)):
                raise UserError(
                    f"label_column {given!r} and label_pattern {self.options.label_pattern!r} both give "
                    "labels; keep one"
                )
            return None
        if not given:
            return None
        if given in header:
            return header.index(given)
        normalized = [_norm_column(h) for h in header]
        if _norm_column(given) in normalized:
            return normalized.index(_norm_column(given))
        if role != "path" and given == _default(option):
            return None
        none = "" if role == "path" else " (or to null: no such column)"
        raise UserError(
            f"{self.csv_path} has no {role} column {given!r}; its columns are: {', '.join(header)}; "
            f"set {option} to one of them{none}"
        )

    def _resolve(self, raw: str, index: DirIndex) -> Path:
        path = self._join(raw)
        if index.exists(path):
            return path
        if "\\" in raw and os.sep == "/":  # written on Windows: img\a.png
            path = self._join(raw.replace("\\", "/"))
            if index.exists(path):
                return path
        if self.path_suffix and not has_media_suffix(path.name):
            return path.with_name(path.name + self.path_suffix)
        if not has_media_suffix(path.name):
            matches = index.by_stem(path.parent, path.name, IMAGE_SUFFIXES + VIDEO_SUFFIXES)
            if len(matches) == 1:
                return path.with_name(matches[0])
            if len(matches) > 1:
                raise UserError(
                    f"{self.csv_path}: {raw!r} matches several files ({', '.join(matches)}); set "
                    "path_suffix (e.g. '.mp4') to choose"
                )
        return path

    def _join(self, raw: str) -> Path:
        path = Path(raw).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else self.path_root / path))  # folds a/../b

    def _cell(self, header: list[str], row: list[str], role: str, line: int) -> str | None:
        col = self.columns[role]
        if col is None:
            return None
        if col >= len(row):
            raise UserError(
                f"{self.csv_path} line {line} has {len(row)} fields, fewer than the header's {len(header)}; fix the row"
            )
        value = row[col].strip()
        if value == "" and role != "split":
            raise UserError(
                f"{self.csv_path} line {line} has an empty {role} in column {header[col]!r}; fill it or delete the row"
            )
        return value

    def _listed(self, header, rows) -> tuple[list[dict], int]:
        """The rows as {path, raw, line, label, group, split}, excluded rows left out."""
        index, listed, seen, excluded = DirIndex(), [], {}, 0
        for line, row in rows:
            raw = self._cell(header, row, "path", line)
            path = self._resolve(raw, index)
            if self.patterns.excludes(path):
                excluded += 1
                continue
            if path in seen:
                raise UserError(f"{self.csv_path} lists {raw!r} twice (lines {seen[path]} and {line}); delete one row")
            seen[path] = line
            label = self._cell(header, row, "label", line)
            if self._label_rx is not None:
                label = capture(
                    self._label_rx, self.options.label_pattern, raw, path, f"{self.csv_path} line {line}:", kind="label"
                )
            listed.append(
                {
                    "path": path,
                    "raw": raw,
                    "line": line,
                    "label": label,
                    "exists": index.exists(path),
                    "group": self._cell(header, row, "group", line),
                    "split": self._split(header, row, line),
                }
            )
        if not listed:
            raise UserError(
                f"every row of {self.csv_path} was excluded by the exclude pattern "
                f"'{self.options.exclude_pattern}'; loosen the pattern"
            )
        require_some_exist(
            [r["path"] for r in listed],
            [r["exists"] for r in listed],
            str(self.csv_path),
            "paths are read relative to the CSV's folder (or path_root); check path_root and path_suffix",
        )
        return listed, excluded

    def _split(self, header, row, line: int) -> str | None:
        value = self._cell(header, row, "split", line)
        if value is None or normalize_split(value) is not None:
            return None if value is None else normalize_split(value)
        raise UserError(
            f"{self.csv_path} line {line}: split {value!r} in column {header[self.columns['split']]!r} is "
            "not train/training, val/valid/validation or test/testing; fix the value, or set "
            "split_column: null to let the writer split by group"
        )

    def _items_of(self, header, rows, listed: list[dict], excluded: int):
        labelled = self.columns["label"] is not None or self._label_rx is not None
        classes, name_of = canonical_labels([r["label"] for r in listed]) if labelled else ([], {})
        label_of = label_indices(classes)
        items: list[SourceItem] = []
        for r in listed:
            path = r["path"]
            rel = relative_to_any(path, self.root, self.path_root)
            group = r["group"]
            if group is None:
                group = self.patterns.group(rel, path, f"{self.csv_path} line {r['line']}:")
            name = name_of.get(r["label"], UNLABELLED)  # unlabelled: name_of is empty
            items.append(
                self._media(
                    path,
                    key=make_key(rel),
                    source=rel,
                    label=label_of.get(name, -1),
                    class_name=name,
                    group=group,
                    split=r["split"],
                )
            )
        missing = [relative_to_any(r["path"], self.root, self.path_root) for r in listed if not r["exists"]]
        stats = {
            "csv": str(self.csv_path),
            "rows": len(rows),
            "listed": len(items),
            "videos": sum(is_listed_video(r["path"]) for r in listed),
            "missing_files": len(missing),
            "missing_examples": missing[:10],
            "excluded": excluded,
            "exclude_pattern": self.options.exclude_pattern,
            "columns": {k: (header[v] if v is not None else None) for k, v in self.columns.items()},
            "label_pattern": self.options.label_pattern,
        }
        return items, stats, classes

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        """A .csv file; a folder holding one is not claimed (a class-folder tree may carry a stray CSV)."""
        root = Path(root)
        return root.is_file() and root.suffix.lower() == ".csv"

    def grouping(self) -> dict:
        if self.columns["group"] is not None:
            return {"mode": "column", "column": self._stats["columns"]["group"], "csv": str(self.csv_path)}
        return self.patterns.grouping(
            "image",
            "no group column or group_pattern: each listed file is its own "
            "group, so images of one patient or video can fall on both sides of a split",
        )


def _default(option: str):
    return next(f.default for f in dataclasses.fields(CsvSource.Options) if f.name == option)
