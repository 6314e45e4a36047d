"""File-name source: images and videos under given folders, the class from the file-name prefix
(e.g. the raw POCUS repository; docs/data.md#sources, "filenames")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from usjepa.errors import UserError
from usjepa.ingest.sources.base import Patterns, Source, check_folder, file_items, register_source
from usjepa.ingest.sources.listed import MediaItems
from usjepa.ingest.sources.walk import IMAGE_SUFFIXES, VIDEO_SUFFIXES, walk


@register_source("filenames")
class FilenameSource(Source):
    """Files under `images` / `videos` folders of SRC labelled by their name prefix."""

    # what each option means: docs/data.md#filenames
    @dataclass(frozen=True)
    class Options:
        label_from_prefix: dict[str, str] = field(default_factory=dict)
        images: tuple[str, ...] | str = ()
        videos: tuple[str, ...] | str = ()
        group_pattern: str | None = None
        exclude_pattern: str | None = None
        unmatched: Literal["skip", "error"] = "skip"
        fps: float | None = None
        max_frames: int | None = None

    looks_for: ClassVar[str] = "never detected: needs label_from_prefix and images/videos folders (use a recipe)"

    def scan(self):
        o = self.options
        check_folder(self.root, "give the folder that holds the images/videos folders")
        if not o.label_from_prefix:
            raise UserError(
                "the filenames source needs label_from_prefix, a mapping of file-name prefix to class, "
                "e.g. {cov: covid, pneu: pneumonia, reg: regular}"
            )
        self.prefixes = {str(k).lower(): str(v) for k, v in o.label_from_prefix.items()}
        self.images = [o.images] if isinstance(o.images, str) else list(o.images)
        self.videos = [o.videos] if isinstance(o.videos, str) else list(o.videos)
        if not self.images and not self.videos:
            raise UserError(
                "the filenames source needs `images` and/or `videos`: folders (relative to "
                f"{self.root}) to search, e.g. images: [data/pocus_images/convex]"
            )
        self.patterns = Patterns(o.group_pattern, o.exclude_pattern)
        media = MediaItems(o.fps, o.max_frames)
        found, videos, unmatched, excluded, ignored = self._find()

        def make(path, **fields):  # a GIF is a video under `videos`, a picture under `images`
            return media(path, video=path in videos, **fields)

        items, classes = file_items(self.root, found, self.patterns, "file", make)
        stats = {
            "files_found": len(items),
            "videos": len(videos),
            "unmatched": len(unmatched),
            "unmatched_examples": unmatched[:10],
            "excluded": excluded,
            "exclude_pattern": o.exclude_pattern,
            "other_files": ignored,
            "label_from_prefix": dict(self.prefixes),
        }
        return items, stats, classes

    def _class_of(self, name: str) -> str | None:
        lower = name.lower()
        best = max((p for p in self.prefixes if lower.startswith(p)), key=len, default=None)
        return None if best is None else self.prefixes[best]

    def _find(self):
        """((path, class) of every matched file, those under `videos`, unmatched files, excluded, of other types)."""
        found, videos, unmatched, excluded, ignored = [], set(), [], 0, 0
        for folders, video, suffixes in ((self.images, False, IMAGE_SUFFIXES), (self.videos, True, VIDEO_SUFFIXES)):
            for folder in folders:
                top = self.root / folder
                if not top.is_dir():
                    raise UserError(f"folder {folder!r} ({top}) does not exist; fix the images/videos option")
                listing = walk(top, lambda p, s=suffixes: p.name.lower().endswith(s), self.patterns)
                excluded, ignored = excluded + listing.excluded, ignored + len(listing.other)
                for path in listing.files:
                    cls = self._class_of(path.name)
                    if cls is None:
                        unmatched.append(path.relative_to(self.root).as_posix())
                    else:
                        found.append((path, cls))
                        if video:
                            videos.add(path)
        if unmatched and self.options.unmatched == "error":
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
        return found, videos, unmatched, excluded, ignored

    def grouping(self) -> dict:
        return self.patterns.grouping(
            "file", "each image and each video is its own group (a video's frames stay together)"
        )
