"""Video source: a folder tree of cine loops; each video is one item whose frames are sampled
by `video_frames` (docs/data.md#sources, "video")."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from PIL import Image

from usjepa.errors import UserError
from usjepa.ingest.sources.base import (
    DEFAULT_EXCLUDE,
    Loaded,
    Patterns,
    Source,
    SourceItem,
    check_folder,
    file_items,
    folder_label_mode,
    register_source,
)
from usjepa.ingest.sources.video_frames import COLOR_MIN_FRACTION, THUMB_SIZE, VideoSettings, read_video
from usjepa.ingest.sources.walk import VIDEO_SUFFIXES, first_files, is_video, subfolders, walk

# first-level folder names that are identifiers, not classes (auto label mode)
_ID_FOLDER = re.compile(r"^(?:(?:patient|subject|case|study|pt|id|p)[\s_-]*)?\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class VideoItem(SourceItem):
    path: Path = field(default=Path(), compare=False)
    settings: VideoSettings = field(default_factory=VideoSettings, compare=False)

    def frames(self) -> Iterator[Loaded]:
        """The kept frames (the whole video is decoded first: the region needs every frame)."""
        yield from read_video(self.path, self.settings, self.source)

    def load(self) -> Loaded:
        return read_video(self.path, self.settings, self.source)[0]


def video_settings(options, hint: str = "") -> VideoSettings:
    """The VideoSettings part of a format's options; UserError naming the bad values (then `hint`)."""
    settings = VideoSettings(**{f.name: getattr(options, f.name) for f in dataclasses.fields(VideoSettings)})
    problems = settings.problems()
    if problems:
        raise UserError("invalid video options: " + "; ".join(problems) + hint)
    return settings


@register_source("video")
class VideoSource(Source):
    """A folder tree of videos, in class folders or unlabelled."""

    # what each option means: docs/data.md#video
    @dataclass(frozen=True)
    class Options(VideoSettings):
        labels: Literal["auto", "folders", "none"] = "auto"
        group_pattern: str | None = None
        exclude_pattern: str | None = DEFAULT_EXCLUDE

    looks_for: ClassVar[str] = (
        "mostly video files (" + ", ".join(VIDEO_SUFFIXES) + "; GIFs only when animated) anywhere below the root"
    )

    def scan(self):
        opts, root = self.options, self.root
        self.settings = video_settings(opts)
        self.patterns = Patterns(opts.group_pattern, opts.exclude_pattern)
        how = f"put the videos ({', '.join(VIDEO_SUFFIXES)}) under {root}, in one subfolder per class or unlabelled"
        check_folder(root, how)
        listing = walk(root, lambda p: is_video(p.name), self.patterns)
        if not listing.files:
            raise UserError(
                f"no videos ({', '.join(VIDEO_SUFFIXES)}) found under {root} ({len(listing.other)} other "
                f"file(s), {listing.excluded} excluded by {opts.exclude_pattern!r}); {how}"
            )
        rels = [p.relative_to(root).as_posix() for p in listing.files]
        self.label_mode, label_note = self._label_mode(rels)
        folders = self.label_mode == "folders"
        found = [(p, rel.split("/", 1)[0] if folders else None) for p, rel in zip(listing.files, rels)]
        make = functools.partial(VideoItem, settings=self.settings)
        items, classes = file_items(root, found, self.patterns, "video", make)
        stats = {
            "videos_found": len(items),
            "extensions": dict(sorted(Counter(p.suffix.lower() for p in listing.files).items())),
            "non_video_files": len(listing.other),
            "excluded": listing.excluded,
            "exclude_pattern": opts.exclude_pattern,
            "labels": self.label_mode,
            "label_note": label_note,
            "sampling": {
                **asdict(self.settings),
                "thumbnail": f"{THUMB_SIZE}x{THUMB_SIZE} box-averaged grayscale",
                "colour_min_fraction": COLOR_MIN_FRACTION,
            },
        }
        if folders:
            stats["empty_class_folders"] = [d.name for d in subfolders(root) if d.name not in classes]
        return items, stats, classes

    def _label_mode(self, rels: list[str]) -> tuple[str, str]:
        loose = [rel for rel in rels if "/" not in rel]
        folders = {rel.split("/", 1)[0] for rel in rels}
        auto = [
            (loose, "videos sit directly in the root, not only in class folders"),
            (len(folders) < 2, "the videos sit in a single folder (an export folder, not classes)"),
            (
                any(map(_ID_FOLDER.match, folders)),
                "first-level folders are named like identifiers (patients, cases), not classes",
            ),
            (len(folders) * 2 > len(rels), "about one video per first-level folder (patient folders, not classes)"),
        ]
        loose_text = f"{len(loose)} video(s) (e.g. {loose[0]!r})" if loose else ""
        why = "every video sits in one of several folders"
        return folder_label_mode(self.options.labels, self.root, loose_text, auto, why)

    @classmethod
    def looks_like(cls, root) -> bool:
        """Most files (of the first 200) are videos; GIFs count only when animated."""
        videos = others = 0
        gifs = []
        for path in first_files(root):
            name = path.name.lower()
            if name.endswith(".gif"):
                gifs.append(path)
            elif is_video(name):
                videos += 1
            else:
                others += 1
        animated = sum(_is_animated_gif(p) for p in gifs[:20])
        if gifs and animated * 2 > min(len(gifs), 20):
            videos += len(gifs)
        else:
            others += len(gifs)
        return videos > 0 and videos * 2 > videos + others

    def grouping(self) -> dict:
        return self.patterns.grouping(
            "video",
            "no group_pattern given: each video is its own group (its frames "
            "stay in one split), but videos of one patient can fall on both sides of a split",
        )


def _is_animated_gif(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            return getattr(img, "n_frames", 1) > 1
    except (OSError, ValueError, SyntaxError):  # an unreadable GIF is no evidence either way
        return False
