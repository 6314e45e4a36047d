"""The one folder walk every format lists its files with: sorted, hidden files and folders
skipped, regular files only, then a type filter and the exclude pattern."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from usjepa.ingest.sources.base import Patterns

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mpg", ".mpeg", ".mkv", ".webm", ".gif")
LOOKS_LIKE_SAMPLE = 200  # files a format's `looks_like` looks at


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_SUFFIXES)


def files_below(root: Path) -> Iterator[Path]:
    """Every non-hidden regular file under `root`, in sorted order (a folder's files before its subfolders')."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():  # never open a FIFO
                yield path


def first_files(root) -> Iterator[Path]:
    """The first LOOKS_LIKE_SAMPLE files of `files_below(root)`: enough for `looks_like` to tell a format, cheaply."""
    return itertools.islice(files_below(root), LOOKS_LIKE_SAMPLE)


@dataclass
class Walk:
    files: list[Path] = field(default_factory=list)  # accepted and not excluded
    other: list[Path] = field(default_factory=list)  # not of the format's type
    excluded: int = 0


def walk(root: Path, accept: Callable[[Path], bool], patterns: Patterns | None = None) -> Walk:
    """The files below `root` that `accept` takes and the exclude pattern does not leave out."""
    out = Walk()
    for path in files_below(root):
        if not accept(path):
            out.other.append(path)
        elif patterns is not None and patterns.excludes(path):
            out.excluded += 1
        else:
            out.files.append(path)
    return out


def subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
