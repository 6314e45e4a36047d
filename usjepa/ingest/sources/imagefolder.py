"""Image-folder source: `root/<class name>/**/<image>`, one first-level folder per class
(docs/data.md#sources, "imagefolder")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from usjepa.errors import UserError
from usjepa.ingest.sources.base import DEFAULT_EXCLUDE, Patterns, Source, check_folder, file_items, register_source
from usjepa.ingest.sources.imagefile import ImageFileItem
from usjepa.ingest.sources.walk import IMAGE_SUFFIXES, files_below, is_image, subfolders, walk


@register_source("imagefolder")
class ImageFolderSource(Source):
    """Each first-level folder is a class (sorted names give labels 0..n-1); images may sit deeper."""

    # what each option means: docs/data.md#imagefolder
    @dataclass(frozen=True)
    class Options:
        group_pattern: str | None = None
        exclude_pattern: str | None = DEFAULT_EXCLUDE

    looks_for: ClassVar[str] = (
        "images (" + ", ".join(IMAGE_SUFFIXES) + ") in one subfolder per class: <root>/<class name>/<image>.png"
    )

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        """A folder whose non-hidden subfolders hold at least one image file (at any depth)."""
        root = Path(root)
        return root.is_dir() and any(is_image(p.name) for sub in subfolders(root) for p in files_below(sub))

    def scan(self):
        root, o = self.root, self.options
        self.patterns = Patterns(o.group_pattern, o.exclude_pattern)
        how = f"put images in one subfolder per class: {root}/<class name>/<image>.png"
        check_folder(root, how)
        top_images = sorted(p.name for p in root.iterdir() if p.is_file() and is_image(p.name))
        if top_images:
            raise UserError(
                f"{len(top_images)} image(s) sit directly in {root} (e.g. {top_images[0]!r}) without a "
                f"class folder; {how}"
            )
        class_dirs = subfolders(root)
        found: list[tuple[Path, str]] = []
        excluded = ignored = 0
        for class_dir in class_dirs:
            listing = walk(class_dir, lambda p: is_image(p.name), self.patterns)
            found += [(path, class_dir.name) for path in listing.files]
            excluded, ignored = excluded + listing.excluded, ignored + len(listing.other)
        if not found:
            raise UserError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) found in class subfolders of {root} ({len(class_dirs)} "
                f"subfolder(s), {excluded} excluded by {o.exclude_pattern!r}, {ignored} other files); {how}"
            )
        items, classes = file_items(root, found, self.patterns, "file", ImageFileItem)
        stats = {
            "images_found": len(items),
            "excluded": excluded,
            "exclude_pattern": o.exclude_pattern,
            "non_image_files": ignored,
            "empty_class_folders": [d.name for d in class_dirs if d.name not in classes],
        }
        return items, stats, classes

    def grouping(self) -> dict:
        return self.patterns.grouping(
            "image",
            "no group_pattern given: each image is its own group, so images of "
            "one patient or video can fall on both sides of a split",
        )
