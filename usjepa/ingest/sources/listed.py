"""Items for files that a table or a naming rule lists (csv, filenames, ultrabench): the image
or video item of a path, cached folder listings, class names from listed labels."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from usjepa.errors import UserError
from usjepa.ingest.sources.base import SourceItem
from usjepa.ingest.sources.imagefile import ImageFileItem
from usjepa.ingest.sources.video import VideoItem, video_settings
from usjepa.ingest.sources.video_frames import VideoSettings
from usjepa.ingest.sources.walk import IMAGE_SUFFIXES, VIDEO_SUFFIXES

# A GIF listed in a table is read as a picture (its first frame), not as a cine loop.
TABLE_VIDEO_SUFFIXES = tuple(s for s in VIDEO_SUFFIXES if s != ".gif")


def is_listed_video(path: Path | str) -> bool:
    return str(path).lower().endswith(TABLE_VIDEO_SUFFIXES)


def has_media_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES + TABLE_VIDEO_SUFFIXES)


class MediaItems:
    """Makes the item for a listed file: an image, or a video sampled with `fps` / `max_frames`
    (None: the video reader's defaults)."""

    def __init__(self, fps: float | None = None, max_frames: int | None = None):
        chosen = {k: v for k, v in (("fps", fps), ("max_frames", max_frames)) if v is not None}
        self.settings = video_settings(VideoSettings(**chosen), "; fix fps / max_frames")

    def __call__(self, path: Path, video: bool | None = None, **fields) -> SourceItem:
        """`fields`: the SourceItem fields (key, source, label, class_name, group, split)."""
        if video if video is not None else is_listed_video(path):
            return VideoItem(path=path, **fields, settings=self.settings)
        return ImageFileItem(path=path, **fields)


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
        suffixes = tuple(suffixes)
        return sorted(n for n in self.names(folder) if n.lower().endswith(suffixes) and n[: n.rfind(".")] == stem)


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
    return sorted(set(names.values()), key=float), names


def require_some_exist(paths: Sequence[Path], exists: Sequence[bool], where: str, hint: str) -> None:
    """UserError when none of the listed files exists (naming the first few)."""
    if paths and not any(exists):
        shown = ", ".join(str(p) for p in paths[:3])
        raise UserError(f"none of the {len(paths)} files listed in {where} exists (e.g. {shown}); {hint}")


def relative_to_any(path: Path, *bases: Path) -> str:
    """`path` relative to the first base it lies below, else as it is ('/'-separated)."""
    for base in bases:
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.as_posix()
