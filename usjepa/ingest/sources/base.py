"""What every source format shares: the item and source types, the registry, and the typed
options each format declares (docs/data.md#sources)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from usjepa.config import ConfigError, from_dict
from usjepa.errors import UserError
from usjepa.shardset.sample import make_key

DEFAULT_EXCLUDE = r"_mask"  # BUSI-style lesion masks (`benign (1)_mask.png`) are not images
UNLABELLED = ""  # class_name of items with label -1


class Loaded(NamedTuple):
    image: np.ndarray  # uint8 (H, W) grayscale, or (H, W, 3) RGB when the input has colour
    region: np.ndarray | None = None  # bool (H, W) when the source provides the region
    info: dict | None = None  # provenance: original mode and size, colour fraction, frame index, ...


@dataclass(frozen=True)
class SourceItem:
    """One input (picture, video, DICOM file); plain and picklable so worker processes can load it."""

    key: str
    source: str  # path relative to the source root, '/'-separated
    label: int  # -1 for unlabelled data (pretraining corpora)
    class_name: str
    group: str
    split: str | None = None  # a split the source prescribes (UltraBench, a CSV column); None: by group

    def load(self) -> Loaded:
        raise NotImplementedError

    def frames(self) -> Iterator[Loaded]:
        """Every image this item holds: one for a picture, several for a cine loop (info["frame"] set)."""
        yield self.load()


@dataclass(frozen=True)
class NoOptions:
    """A format without options."""


class Source:
    """The items of one source folder or file, listed once when constructed, plus what the
    manifest says about where they came from. `Options` is the format's typed options."""

    format_name: ClassVar[str] = ""
    looks_for: ClassVar[str] = ""
    """One line saying what `looks_like` checks, for the error of `--format auto`."""
    Options: ClassVar[type] = NoOptions
    root: Path
    classes: list[str]
    _items: list[SourceItem]
    _stats: dict

    def __init__(self, root, **options):
        self.options = read_options(type(self), options)
        self.root = Path(root).expanduser().absolute()
        self._items, self._stats, self.classes = self.scan()

    def scan(self) -> tuple[list[SourceItem], dict, list[str]]:
        """(items, stats, classes) of the source at `self.root`."""
        raise NotImplementedError

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        """Whether `root` is in this format (for `--format auto`); cheap."""
        return False

    def __iter__(self) -> Iterator[SourceItem]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def grouping(self) -> dict:
        """How groups were formed, for the manifest."""
        return {}

    def stats(self) -> dict:
        """Counts about the listing (files found, excluded, ...), for the manifest."""
        return dict(self._stats)


SOURCES: dict[str, type[Source]] = {}


def register_source(name: str):
    def decorate(cls):
        SOURCES[name] = cls
        cls.format_name = name
        return cls

    return decorate


def option_names(cls: type[Source]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls.Options)]


def describe_options(cls: type[Source]) -> str:
    """'name=default, ...' of a format's options (for the CLI help)."""
    parts = []
    for f in dataclasses.fields(cls.Options):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        parts.append(f"{f.name}={default!r}" if default is not dataclasses.MISSING else f.name)
    return ", ".join(parts) or "no options"


def _plain(value):
    """Python values callers pass (paths, settings dataclasses) as the plain values a recipe gives."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def read_options(cls: type[Source], given: Mapping):
    """`given` (the CLI's --source-option values, a recipe's options) as `cls.Options`; an
    unknown key or a value of the wrong type is a ConfigError naming the format."""
    try:
        return from_dict(cls.Options, {k: _plain(v) for k, v in given.items()}, where="options")
    except ConfigError as exc:
        raise ConfigError(f"source format {cls.format_name!r}: {exc}") from None


def open_source(format_name: str, root, **options) -> Source:
    """The registered source `format_name` over `root`, with its options."""
    if format_name not in SOURCES:
        raise UserError(f"unknown source format {format_name!r}; known formats: {', '.join(sorted(SOURCES))}")
    return SOURCES[format_name](root, **options)


def compile_pattern(pattern: str | None, what: str, need_group: bool) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"{what} '{pattern}' is not a valid regular expression ({exc}); fix the pattern") from None
    if need_group and rx.groups < 1:
        raise UserError(f"{what} '{pattern}' has no capture group; wrap the id in parentheses, e.g. 'patient_(\\d+)'")
    return rx


class Patterns:
    """A source's group pattern (first capture group of the file stem) and exclude pattern."""

    def __init__(self, group_pattern: str | None, exclude_pattern: str | None):
        self.group_pattern, self.exclude_pattern = group_pattern, exclude_pattern
        self.group_rx = compile_pattern(group_pattern, "group pattern", need_group=True)
        self.exclude_rx = compile_pattern(exclude_pattern, "exclude pattern", need_group=False)

    def excludes(self, path: Path) -> bool:
        return self.exclude_rx is not None and self.exclude_rx.search(path.stem) is not None

    def group(self, rel: str, path: Path, what: str) -> str:
        """The group of file `rel`: the pattern's first capture group in its stem, else the file itself."""
        return capture(self.group_rx, self.group_pattern, rel, path, what)

    def grouping(self, unit: str, note: str) -> dict:
        """The manifest's account of the groups: from the pattern, or one per `unit` (`note`: what that risks)."""
        if self.group_pattern is None:
            return {"mode": f"per_{unit}", "pattern": None, "note": note}
        return {"mode": "pattern", "pattern": self.group_pattern, "applied_to": "file stem, first capture group"}


def capture(rx: re.Pattern | None, pattern: str | None, rel: str, path: Path, what: str, kind: str = "group") -> str:
    """The first capture group of `rx` in the stem of file `rel` (`rel` itself without a pattern);
    `what` names the file in the error ("video", "file", a CSV line)."""
    if rx is None:
        return rel
    match = rx.search(path.stem)
    if match is None or match.group(1) is None:
        raise UserError(
            f"{what} {rel!r} (stem {path.stem!r}) does not match the {kind} pattern '{pattern}'; fix the "
            f"pattern so every file name yields a {kind}, or rename the file"
        )
    return match.group(1)


def check_folder(root: Path, how: str, what: str = "source") -> None:
    if not root.exists():
        raise UserError(f"{what} folder {root} does not exist; check the path ({how})")
    if not root.is_dir():
        raise UserError(f"{what} {root} is not a folder; {how}")


def folder_label_mode(labels: str, root: Path, loose: str, auto: list, auto_folders: str) -> tuple[str, str]:
    """(label mode, note) of a tree whose first-level folders may be classes. `labels`: 'none';
    'folders' (a UserError when files sit directly in `root`; `loose` says which, e.g. '2 file(s)',
    '' for none); or 'auto': 'none' for the first (applies, why) of `auto` that applies, else
    'folders' (why: `auto_folders`)."""
    if labels == "none":
        return "none", "unlabelled (labels='none')"
    if labels == "folders":
        if loose:
            raise UserError(
                f"labels='folders' needs one subfolder per class in {root}, but {loose} sit directly in it; move "
                f"them into class folders ({root}/<class>/...) or use labels='none'"
            )
        return "folders", "first-level folder names (labels='folders')"
    why_not = next((why for applies, why in auto if applies), None)
    if why_not is not None:
        return "none", f"unlabelled: {why_not}"
    return "folders", f"first-level folder names (auto: {auto_folders})"


def label_indices(classes: list) -> dict:
    """class -> label (its index in `classes`)."""
    return {c: i for i, c in enumerate(classes)}


def file_items(root: Path, found, patterns: Patterns, what: str, make) -> tuple[list[SourceItem], list[str]]:
    """(items, sorted class names) of the files `found` below `root`, given as (path, class name or
    None: unlabelled): key and source from the path relative to `root`, group from `patterns` (`what`
    names the file in its error); `make(path=..., **fields)` builds the item."""
    classes = sorted({cls for _, cls in found if cls is not None})
    labels = label_indices(classes)
    items = []
    for path, cls in found:
        rel = path.relative_to(root).as_posix()
        items.append(
            make(
                path=path,
                key=make_key(rel),
                source=rel,
                label=-1 if cls is None else labels[cls],
                class_name=UNLABELLED if cls is None else cls,
                group=patterns.group(rel, path, what),
            )
        )
    return items, classes
