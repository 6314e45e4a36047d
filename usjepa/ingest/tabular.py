r"""Sources described by a table or by file names: a CSV manifest (`csv`) and folders of
files whose name prefix gives the class (`filenames`).

`csv`: SRC is a CSV file, or a folder that holds exactly one (`--format auto` recognises the
.csv file itself; a folder needs `--format csv`). One row per image or video:

    path,label,patient,split
    benign/benign (1).png,benign,17,train
    /data/other/scan_0003.png,malignant,18,test

Columns (each an option; None = auto-detect, False = do not use such a column):
- path_column: file path, relative to `path_root` (a folder, itself relative to the CSV's
  folder; default the CSV's folder) or absolute. Auto: the first column named path, file,
  filename, filepath, image, image_path, image_file, video_file, video_path, ... (case,
  spaces and hyphens ignored). A path without a file suffix (COVID-BLUES lists
  `patient_62_R1`) gets `path_suffix` (e.g. ".mp4") or, without it, the one media file of
  that stem in its folder.
- label_column: class names (stripped); classes are the sorted unique values, labels their
  indices. When every value is a number the order is numeric and integral floats lose their
  ".0" ("2.0" -> "2"). Auto: label, labels, class, class_name, diagnosis, category,
  target. No label column: every item is unlabelled (label -1, class_name "", no
  classes), as the video source does.
- label_pattern: instead of a label column, the class is the first capture group of this
  regex searched in the file stem (COVID-BLUES: '_[LR](\d)' gives the scanning point 1-3 of
  `patient_62_R1`); a file it does not match is an error naming its line.
- group_column: patient/study/video id that splits keep together. Auto: patient,
  patient_id, group, study, video, subject, case (and *_id). Without one, `group_pattern`
  (a regex whose first capture group, searched in the file stem, is the id) or else each
  file is its own group.
- split_column: a prescribed split per row: train/training, val/valid/validation/dev,
  test/testing (any case); anything else (empty included) is an error naming the line.
  Auto: split, fold, subset, partition.

A listed file that does not exist is kept as an item whose load() raises (the writer skips
and reports it); when no listed file exists at all, the source raises a UserError naming
the first few. A file listed twice is an error. Rows whose file stem matches
`exclude_pattern` are left out and counted.

Video files (.mp4, .avi, .mov, ...; a .gif listed in a CSV is read as an image) become
`usjepa.ingest.video.VideoItem`s sampled with `fps` / `max_frames` (None: the video
reader's defaults); each is one item whose `frames()` are its sampled frames. Without that
module they are placeholder items whose load() raises NotImplementedError (listing,
labels and groups still work).

`filenames`: files under `images` and `videos` folders (relative to SRC, searched
recursively) whose name starts with a key of `label_from_prefix` (case-insensitive, the
longest key wins), e.g. the raw POCUS repository with
`{cov: covid, pneu: pneumonia, reg: regular}`. Files matching no prefix are skipped and
counted (`unmatched="error"` makes them an error). Each file is its own group (a video's
frames stay together) unless `group_pattern` is given.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from usjepa.errors import UserError
from usjepa.shardset.sample import make_key
from usjepa.ingest.sources import (
    IMAGE_SUFFIXES,
    ImageFileItem,
    Source,
    SourceItem,
    compile_pattern,
    group_from_pattern,
    pattern_grouping,
    register_source,
)
from usjepa.ingest.video import VIDEO_SUFFIXES, VideoItem, VideoSettings

# A GIF listed in a table is read as a picture (its first frame), not as a cine loop.
TABLE_VIDEO_SUFFIXES = tuple(s for s in VIDEO_SUFFIXES if s != ".gif")
UNLABELLED = ""  # class_name of items with label -1 (as the video source)

PATH_COLUMNS = ("path", "file", "filename", "file_name", "filepath", "file_path", "relative_path", "image",
                "image_path", "imagepath", "image_file", "image_name", "img", "img_path", "video_file",
                "video_path", "video_name")
LABEL_COLUMNS = ("label", "labels", "class", "class_name", "classname", "diagnosis", "category", "target")
GROUP_COLUMNS = ("patient", "patient_id", "patientid", "group", "group_id", "study", "study_id", "video",
                 "video_id", "subject", "subject_id", "case", "case_id")
SPLIT_COLUMNS = ("split", "fold", "subset", "partition")

SPLIT_NAMES = {
    "train": "train", "training": "train", "trn": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "tst": "test",
}


# ---------------------------------------------------------------------------- helpers
def normalize_split(value: str) -> str | None:
    """'Training' -> 'train', 'VALID' -> 'val', ...; None when not a known split name."""
    return SPLIT_NAMES.get(str(value).strip().lower())


def is_video(path: Path | str) -> bool:
    return str(path).lower().endswith(TABLE_VIDEO_SUFFIXES)


def _has_media_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES + TABLE_VIDEO_SUFFIXES)


class MediaItems:
    """Makes the item for a listed file: an `ImageFileItem`, or a video item sampled with
    `fps` / `max_frames` (None: the video reader's defaults, 3 fps and 30 frames)."""

    def __init__(self, fps: float | None = None, max_frames: int | None = None):
        chosen = {k: v for k, v in (("fps", fps), ("max_frames", max_frames)) if v is not None}
        try:
            settings = VideoSettings(**chosen)
        except TypeError as exc:
            raise UserError(f"invalid video options {chosen}: {exc}") from None
        problems = settings.problems()
        if problems:
            raise UserError("invalid video options: " + "; ".join(problems) + "; fix fps / max_frames")
        self.settings = settings

    def __call__(self, path: Path, video: bool | None = None, **fields) -> SourceItem:
        """`fields`: the SourceItem fields (key, source, label, class_name, group, split)."""
        if video is None:
            video = is_video(path)
        if not video:
            return ImageFileItem(path=path, **fields)
        return VideoItem(path=path, **fields, settings=self.settings)


class DirIndex:
    """Cached listings of folders: existence checks and stem lookups without a stat per file."""

    def __init__(self):
        self._names: dict[Path, set[str]] = {}

    def names(self, folder: Path) -> set[str]:
        if folder not in self._names:
            try:
                self._names[folder] = {e.name for e in os.scandir(folder) if not e.is_dir()}
            except OSError:
                self._names[folder] = set()
        return self._names[folder]

    def exists(self, path: Path) -> bool:
        return path.name in self.names(path.parent)

    def by_stem(self, folder: Path, stem: str, suffixes: Sequence[str]) -> list[str]:
        """File names in `folder` whose stem is `stem` and whose suffix is one of `suffixes`."""
        return sorted(n for n in self.names(folder)
                      if n.lower().endswith(tuple(suffixes)) and n[: n.rfind(".")] == stem)


def _norm_column(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


def canonical_labels(values: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(sorted class names, raw value -> class name). All-numeric values sort numerically and
    integral floats drop their '.0'; anything else sorts as text."""
    unique = sorted(set(values))
    try:
        numbers = {v: float(v) for v in unique}
    except ValueError:
        numbers = {}
    if not numbers or not all(math.isfinite(x) for x in numbers.values()):
        return unique, {v: v for v in unique}
    names = {v: (str(int(x)) if x.is_integer() else v) for v, x in numbers.items()}
    order = sorted(set(names.values()), key=lambda n: float(n))
    return order, names


def require_some_exist(paths: Sequence[tuple[str, Path]], exists: Sequence[bool], where: str, hint: str) -> None:
    """UserError when none of the listed files exists (naming the first few)."""
    if paths and not any(exists):
        shown = ", ".join(f"{p}" for _, p in paths[:3])
        raise UserError(f"none of the {len(paths)} files listed in {where} exists (e.g. {shown}); {hint}")


# ---------------------------------------------------------------------------- csv
@register_source("csv")
class CsvSource(Source):
    """A CSV manifest: one row per image or video (see the module docstring)."""

    looks_for: ClassVar[str] = ("a CSV manifest given as the .csv file itself, with a path column (path, file, "
                                "filename, image, image_path, video_file, ...)")

    def __init__(
        self,
        root,
        path_column: str | None = None,
        label_column: str | bool | None = None,
        group_column: str | bool | None = None,
        split_column: str | bool | None = None,
        path_root: str | None = None,
        path_suffix: str | None = None,
        group_pattern: str | None = None,
        label_pattern: str | None = None,
        exclude_pattern: str | None = None,
        delimiter: str | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
    ):
        self.csv_path = self._find_csv(Path(root).expanduser().absolute())
        self.root = self.csv_path.parent  # sources are recorded relative to it where they lie below it
        self.path_root = self.root
        if path_root:
            self.path_root = (self.root / Path(path_root).expanduser()).absolute()
            if not self.path_root.is_dir():
                raise UserError(f"path_root {path_root!r} ({self.path_root}) is not a folder; give the folder the "
                                "CSV's paths are relative to (relative to the CSV's folder, or absolute)")
        self.path_suffix = path_suffix if not path_suffix or path_suffix.startswith(".") else "." + path_suffix
        self.group_pattern = group_pattern
        self.exclude_pattern = exclude_pattern
        self._group_rx = compile_pattern(group_pattern, "group pattern", need_group=True)
        self._exclude_rx = compile_pattern(exclude_pattern, "exclude pattern", need_group=False)
        self.label_pattern = label_pattern
        self._label_rx = compile_pattern(label_pattern, "label pattern", need_group=True)
        if label_pattern is not None:
            if label_column:
                raise UserError(f"label_column {label_column!r} and label_pattern {label_pattern!r} both give labels; "
                                "keep one")
            label_column = False
        self._media = MediaItems(fps, max_frames)
        header, rows = self._read(delimiter)
        self.columns: dict[str, int | None] = {}
        self.columns["path"] = self._column(header, path_column, PATH_COLUMNS, "path", required=True)
        self.columns["label"] = self._column(header, label_column, LABEL_COLUMNS, "label")
        self.columns["group"] = self._column(header, group_column, GROUP_COLUMNS, "group")
        self.columns["split"] = self._column(header, split_column, SPLIT_COLUMNS, "split")
        self._items, self._stats, self.classes = self._scan(header, rows)

    # -- reading
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

    def _read(self, delimiter: str | None) -> tuple[list[str], list[tuple[int, list[str]]]]:
        try:
            text = self.csv_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UserError(f"{self.csv_path} is not UTF-8 text ({exc}); save the CSV as UTF-8") from None
        if delimiter is None:
            try:
                delimiter = csv.Sniffer().sniff(text[:65536].split("\n", 1)[0], delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = ","
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise UserError(f"{self.csv_path} is empty; it needs a header row and one row per file") from None
        except csv.Error as exc:
            raise UserError(f"{self.csv_path} line 1 is not valid CSV ({exc}); fix the file") from None
        rows = []
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append((reader.line_num, row))
        except csv.Error as exc:
            raise UserError(f"{self.csv_path} line {reader.line_num} is not valid CSV ({exc}); fix the file") from None
        if not rows:
            raise UserError(f"{self.csv_path} has a header ({', '.join(header)}) but no rows; list one file per row")
        return header, rows

    def _column(self, header: list[str], given, candidates: Sequence[str], what: str,
                required: bool = False) -> int | None:
        """Index of the `what` column: the given name (exact, else ignoring case and
        punctuation), else the first candidate present that no other role took."""
        if given is False or given == "":
            return None
        normalized = [_norm_column(h) for h in header]
        if given is not None and given is not True:
            if given in header:
                return header.index(given)
            if _norm_column(given) in normalized:
                return normalized.index(_norm_column(given))
            raise UserError(
                f"{self.csv_path} has no {what} column {given!r}; its columns are: {', '.join(header)}; "
                f"set {what}_column to one of them"
            )
        taken = {i for i in self.columns.values() if i is not None}
        for name in candidates:
            if name in normalized and normalized.index(name) not in taken:
                return normalized.index(name)
        if required:
            raise UserError(
                f"cannot find the {what} column in {self.csv_path}: its columns are {', '.join(header)} "
                f"(looked for {', '.join(candidates[:8])}, ...); set {what}_column to the column that holds "
                "the file paths"
            )
        return None

    # -- listing
    def _resolve(self, raw: str, index: DirIndex) -> Path:
        path = self._join(raw)
        if index.exists(path):
            return path
        if "\\" in raw and os.sep == "/":  # written on Windows: img\a.png
            path = self._join(raw.replace("\\", "/"))
            if index.exists(path):
                return path
        if self.path_suffix and not _has_media_suffix(path.name):
            return path.with_name(path.name + self.path_suffix)
        if not _has_media_suffix(path.name):
            matches = index.by_stem(path.parent, path.name, IMAGE_SUFFIXES + VIDEO_SUFFIXES)
            if len(matches) == 1:
                return path.with_name(matches[0])
            if len(matches) > 1:
                raise UserError(
                    f"{self.csv_path}: {raw!r} matches several files ({', '.join(matches)}); set path_suffix "
                    "(e.g. '.mp4') to choose"
                )
        return path

    def _join(self, raw: str) -> Path:
        path = Path(raw).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else self.path_root / path))  # folds a/../b

    def _relative(self, path: Path) -> str:
        for base in (self.root, self.path_root):
            try:
                return path.relative_to(base).as_posix()
            except ValueError:
                continue
        return path.as_posix()

    def _scan(self, header: list[str], rows) -> tuple[list[SourceItem], dict, list[str]]:
        cols = self.columns
        where = str(self.csv_path)

        def cell(row: list[str], col: int | None, line: int) -> str | None:
            if col is None:
                return None
            if col >= len(row):
                raise UserError(f"{where} line {line} has {len(row)} fields, fewer than the header's {len(header)}; "
                                "fix the row")
            return row[col].strip()

        index = DirIndex()
        listed: list[dict] = []
        seen: dict[Path, int] = {}
        excluded = 0
        for line, row in rows:
            raw = cell(row, cols["path"], line)
            if not raw:
                raise UserError(f"{where} line {line} has an empty path in column {header[cols['path']]!r}; "
                                "fill it or delete the row")
            path = self._resolve(raw, index)
            if self._exclude_rx is not None and self._exclude_rx.search(path.stem):
                excluded += 1
                continue
            if path in seen:
                raise UserError(f"{where} lists {raw!r} twice (lines {seen[path]} and {line}); delete one row")
            seen[path] = line
            label = cell(row, cols["label"], line)
            if self._label_rx is not None:
                label = group_from_pattern(self._label_rx, self.label_pattern, raw, path, f"{where} line {line}:",
                                           kind="label")
            if label == "":
                raise UserError(f"{where} line {line} has an empty label in column {header[cols['label']]!r}; "
                                "fill it or delete the row")
            group = cell(row, cols["group"], line)
            if group == "":
                raise UserError(f"{where} line {line} has an empty group in column {header[cols['group']]!r}; "
                                "fill it or delete the row")
            split = cell(row, cols["split"], line)
            if split is not None:
                value, split = split, normalize_split(split)
                if split is None:
                    raise UserError(
                        f"{where} line {line}: split {value!r} in column {header[cols['split']]!r} is not "
                        "train/training, val/valid/validation or test/testing; fix the value, or set "
                        "split_column: false to let the writer split by group"
                    )
            listed.append({"path": path, "raw": raw, "line": line, "label": label, "group": group, "split": split})
        if not listed:
            raise UserError(f"every row of {where} was excluded by the exclude pattern '{self.exclude_pattern}'; "
                            "loosen the pattern")
        exists = [index.exists(r["path"]) for r in listed]
        require_some_exist(
            [(r["raw"], r["path"]) for r in listed], exists, where,
            "paths are read relative to the CSV's folder (or path_root); check path_root and path_suffix",
        )

        if cols["label"] is not None or self._label_rx is not None:
            classes, name_of = canonical_labels([r["label"] for r in listed])
            label_of = {c: i for i, c in enumerate(classes)}
        else:
            classes, name_of, label_of = [], {}, {}
        items: list[SourceItem] = []
        videos = 0
        for r in listed:
            path = r["path"]
            rel = self._relative(path)
            if r["group"] is not None:
                group = r["group"]
            else:
                group = group_from_pattern(self._group_rx, self.group_pattern, rel, path, f"{where} line {r['line']}:")
            name = name_of.get(r["label"], UNLABELLED) if r["label"] is not None else UNLABELLED
            video = is_video(path)
            videos += video
            items.append(self._media(
                path, video=video, key=make_key(rel), source=rel, label=label_of.get(name, -1), class_name=name,
                group=group, split=r["split"],
            ))
        missing = [self._relative(r["path"]) for r, ok in zip(listed, exists) if not ok]
        stats = {
            "csv": str(self.csv_path),
            "rows": len(rows),
            "listed": len(items),
            "videos": videos,
            "missing_files": len(missing),
            "missing_examples": missing[:10],
            "excluded": excluded,
            "exclude_pattern": self.exclude_pattern,
            "columns": {k: (header[v] if v is not None else None) for k, v in cols.items()},
            "label_pattern": self.label_pattern,
        }
        return items, stats, classes

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        """A .csv file. A folder holding one is not claimed: a class-folder tree with a stray
        metadata CSV stays an image folder (pass --format csv for such a folder)."""
        root = Path(root)
        return root.is_file() and root.suffix.lower() == ".csv"

    def grouping(self) -> dict:
        col = self.columns["group"]
        if col is not None:
            return {"mode": "column", "column": self._stats["columns"]["group"], "csv": str(self.csv_path)}
        return pattern_grouping(self.group_pattern, "image", "no group column or group_pattern: each listed file "
                                "is its own group, so images of one patient or video can fall on both sides of a split")


# ---------------------------------------------------------------------------- filenames
@register_source("filenames")
class FilenameSource(Source):
    """Files under `images` / `videos` folders of SRC labelled by their name prefix (see the
    module docstring); e.g. the raw POCUS repository."""

    looks_for: ClassVar[str] = "never detected: needs label_from_prefix and images/videos folders (use a recipe)"

    def __init__(
        self,
        root,
        label_from_prefix: dict | None = None,
        images: Sequence[str] | str = (),
        videos: Sequence[str] | str = (),
        group_pattern: str | None = None,
        exclude_pattern: str | None = None,
        unmatched: str = "skip",
        fps: float | None = None,
        max_frames: int | None = None,
    ):
        self.root = Path(root).expanduser().absolute()
        if not self.root.is_dir():
            raise UserError(f"source folder {self.root} does not exist or is not a folder; check the path")
        if not label_from_prefix or not isinstance(label_from_prefix, dict):
            raise UserError("the filenames source needs label_from_prefix, a mapping of file-name prefix to class, "
                            "e.g. {cov: covid, pneu: pneumonia, reg: regular}")
        if unmatched not in ("skip", "error"):
            raise UserError(f"unmatched={unmatched!r} must be 'skip' or 'error'")
        self.prefixes = {str(k).lower(): str(v) for k, v in label_from_prefix.items()}
        self.images = [images] if isinstance(images, str) else list(images)
        self.videos = [videos] if isinstance(videos, str) else list(videos)
        if not self.images and not self.videos:
            raise UserError("the filenames source needs `images` and/or `videos`: folders (relative to "
                            f"{self.root}) to search, e.g. images: [data/pocus_images/convex]")
        self.group_pattern, self.exclude_pattern, self.unmatched = group_pattern, exclude_pattern, unmatched
        self._group_rx = compile_pattern(group_pattern, "group pattern", need_group=True)
        self._exclude_rx = compile_pattern(exclude_pattern, "exclude pattern", need_group=False)
        self._media = MediaItems(fps, max_frames)
        self._items, self._stats, self.classes = self._scan()

    def _class_of(self, name: str) -> str | None:
        lower = name.lower()
        best = max((p for p in self.prefixes if lower.startswith(p)), key=len, default=None)
        return None if best is None else self.prefixes[best]

    def _scan(self):
        found: list[tuple[Path, bool, str]] = []  # (path, is video, class)
        unmatched: list[str] = []
        excluded = ignored = 0
        for folders, video, suffixes in ((self.images, False, IMAGE_SUFFIXES), (self.videos, True, VIDEO_SUFFIXES)):
            for folder in folders:
                top = self.root / folder
                if not top.is_dir():
                    raise UserError(f"folder {folder!r} ({top}) does not exist; fix the images/videos option")
                for dirpath, dirnames, filenames in os.walk(top):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    for name in sorted(filenames):
                        if name.startswith("."):
                            continue
                        if not name.lower().endswith(suffixes):
                            ignored += 1
                            continue
                        path = Path(dirpath) / name
                        if self._exclude_rx is not None and self._exclude_rx.search(path.stem):
                            excluded += 1
                            continue
                        cls = self._class_of(name)
                        if cls is None:
                            unmatched.append(path.relative_to(self.root).as_posix())
                            continue
                        found.append((path, video, cls))
        if unmatched and self.unmatched == "error":
            raise UserError(
                f"{len(unmatched)} file(s) under {self.root} match no prefix of label_from_prefix "
                f"({', '.join(self.prefixes)}), e.g. {unmatched[0]!r}; add a prefix or set unmatched: skip"
            )
        if not found:
            raise UserError(
                f"no files under {self.root} ({', '.join(self.images + self.videos)}) start with a prefix of "
                f"label_from_prefix ({', '.join(self.prefixes)}); {len(unmatched)} unmatched, {excluded} excluded, "
                f"{ignored} of other types; check the folders and prefixes"
            )
        classes = sorted({c for _, _, c in found})
        label_of = {c: i for i, c in enumerate(classes)}
        items = []
        for path, video, cls in found:
            rel = path.relative_to(self.root).as_posix()
            items.append(self._media(
                path, video=video, key=make_key(rel), source=rel, label=label_of[cls], class_name=cls,
                group=group_from_pattern(self._group_rx, self.group_pattern, rel, path, "file"),
            ))
        stats = {
            "files_found": len(items),
            "videos": sum(v for _, v, _ in found),
            "unmatched": len(unmatched),
            "unmatched_examples": unmatched[:10],
            "excluded": excluded,
            "exclude_pattern": self.exclude_pattern,
            "other_files": ignored,
            "label_from_prefix": dict(self.prefixes),
        }
        return items, stats, classes

    def grouping(self) -> dict:
        return pattern_grouping(self.group_pattern, "file",
                                "each image and each video is its own group (a video's frames stay together)")


__all__ = [
    "UNLABELLED",
    "CsvSource",
    "DirIndex",
    "FilenameSource",
    "MediaItems",
    "canonical_labels",
    "is_video",
    "normalize_split",
]
