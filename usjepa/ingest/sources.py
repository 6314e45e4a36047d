"""Where images come from: a `Source` is an iterable of `SourceItem`s, one per image.

An item knows its stable key, its path relative to the source root, its class and group,
and how to `load()` itself as a uint8 array: grayscale (H, W), or RGB (H, W, 3) when the
input has colour (the builder inpaints or flags colour overlays, `overlay.py`, and converts
to grayscale), plus a region mask when the source ships one. Formats register by name
(`@register_source("imagefolder")`), say how to recognise them (`looks_like`, described by
`looks_for`, used by `formats.detect_format`); `open_source` picks one. Items are plain
picklable dataclasses so worker processes can load them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageOps

from usjepa.errors import UserError
from usjepa.shardset.sample import make_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm")
DEFAULT_EXCLUDE = r"_mask"  # BUSI-style lesion masks (`benign (1)_mask.png`) are not images


class Loaded(NamedTuple):
    image: np.ndarray  # uint8 (H, W) grayscale, or (H, W, 3) RGB when the input has colour
    region: np.ndarray | None = None  # bool (H, W) when the source provides the region
    info: dict | None = None  # provenance: original mode and size, colour fraction, frame index, ...


@dataclass(frozen=True)
class SourceItem:
    key: str
    source: str  # path relative to the source root, '/'-separated
    label: int  # -1 for unlabelled data (pretraining corpora)
    class_name: str
    group: str
    split: str | None = None  # a split the source prescribes (UltraBench, a CSV column); None: by group

    def load(self) -> Loaded:
        raise NotImplementedError

    def frames(self) -> Iterator[Loaded]:
        """Every image this item holds: one for a picture, several for a cine loop or a
        multi-frame DICOM (each with info["frame"] set)."""
        yield self.load()


# ---------------------------------------------------------------------------- grayscale
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def pil_to_array(img: Image.Image) -> tuple[np.ndarray, dict]:
    """PIL image -> (uint8 array, info), keeping colour: (H, W) for grayscale input, (H, W, 3)
    RGB for colour input. RGB whose three channels are equal everywhere (grayscale stored as
    RGB, a gray palette) is collapsed to (H, W) losslessly; alpha is dropped; 16-bit and
    float images are scaled linearly from [min(0, lo), hi] to 0-255. EXIF orientation is
    applied. What to do with real colour is the builder's choice (`overlay.to_gray`)."""
    img = ImageOps.exif_transpose(img)
    info = {"orig_mode": img.mode, "orig_size": [img.width, img.height]}
    mode = img.mode
    if mode == "L":
        return np.asarray(img), info
    if mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(img).astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("image holds non-finite pixel values")
        lo, hi = min(0.0, float(arr.min())), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return np.clip(np.rint((arr - lo) * scale), 0, 255).astype(np.uint8), info
    if mode in ("LA", "1"):
        return np.asarray(img.getchannel("L") if mode == "LA" else img.convert("L")), info
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    red, green, blue = rgb.split()  # comparing in PIL: cheaper than converting all of RGB to numpy
    if ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(green, blue).getbbox() is None:
        return np.asarray(red), info
    return np.asarray(rgb), info


def collapse_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W) when the three channels of an (H, W, 3) uint8 array are identical, else the
    array unchanged (lossless either way)."""
    red = rgb[..., 0]
    if np.array_equal(red, rgb[..., 1]) and np.array_equal(red, rgb[..., 2]):
        return np.ascontiguousarray(red)
    return rgb


def pil_to_gray(img: Image.Image) -> tuple[np.ndarray, dict]:
    """PIL image -> (uint8 HxW, info), for callers that want grayscale straight away (the
    builder itself loads with `pil_to_array` so colour overlays can be inpainted). Never
    keeps colour: RGB-like modes become luma (ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B,
    PIL's "L" conversion); alpha is dropped; 16-bit and float images are scaled linearly
    from [min(0, lo), hi] to 0-255."""
    img = ImageOps.exif_transpose(img)
    info = {"orig_mode": img.mode, "orig_size": [img.width, img.height]}
    mode = img.mode
    if mode == "L" or mode in _HIGH_DEPTH_MODES or mode == "LA":
        return pil_to_array(img)
    rgb = img.convert("RGB")
    info["color_fraction"] = color_fraction(rgb)
    return np.asarray(rgb.convert("L")), info


def color_fraction(rgb: Image.Image, tolerance: int = 16) -> float:
    """Share of pixels whose channels differ by more than `tolerance` (Doppler boxes,
    coloured annotations): recorded per sample for a later overlay-inpainting step."""
    r, g, b = rgb.split()
    spread = ImageChops.lighter(ImageChops.difference(r, g), ImageChops.difference(g, b))
    spread = ImageChops.lighter(spread, ImageChops.difference(r, b))
    histogram = spread.histogram()
    return round(sum(histogram[tolerance + 1 :]) / (rgb.width * rgb.height), 4)


def load_gray_image(path: Path) -> tuple[np.ndarray, dict]:
    """Decode an image file fully (truncated or corrupt files raise) as uint8 grayscale."""
    with Image.open(path) as img:
        img.load()
        return pil_to_gray(img)


def load_image(path: Path) -> tuple[np.ndarray, dict]:
    """Decode an image file fully (truncated or corrupt files raise) as uint8 grayscale
    (H, W), or RGB (H, W, 3) when it has colour (`pil_to_array`)."""
    with Image.open(path) as img:
        img.load()
        return pil_to_array(img)


@dataclass(frozen=True)
class ImageFileItem(SourceItem):
    path: Path = field(default=Path(), compare=False)

    def load(self) -> Loaded:
        image, info = load_image(self.path)
        return Loaded(image, None, info)


# ---------------------------------------------------------------------------- registry
class Source:
    """An iterable of items plus what the manifest needs to say about where they came from."""

    format_name: ClassVar[str] = ""
    looks_for: ClassVar[str] = ""
    """One line saying what `looks_like` checks, for the error of `--format auto` when no
    format recognises a folder (e.g. "*.dcm files (DICOM) anywhere below the root")."""
    root: Path
    classes: list[str]
    # Every source lists its items once, when constructed (listing is cheap next to decoding,
    # and the writer needs the whole list to order and split it).
    _items: list[SourceItem]
    _stats: Mapping = MappingProxyType({})  # a source with nothing to count keeps this empty one

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        """Whether `root` is in this format (for `--format auto`). Cheap: stop at the first
        file that decides it."""
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


def group_from_pattern(rx: re.Pattern | None, pattern: str | None, rel: str, path: Path, what: str,
                       kind: str = "group") -> str:
    """The group id (or, with kind="label", the class) of file `rel`: the first capture group
    of `rx` in its stem, or the file itself without a pattern. `what` names the file in the
    error ("video", "file", a CSV line)."""
    if rx is None:
        return rel
    match = rx.search(path.stem)
    if match is None or match.group(1) is None:
        raise UserError(
            f"{what} {rel!r} (stem {path.stem!r}) does not match the {kind} pattern '{pattern}'; fix the "
            f"pattern so every file name yields a {kind}, or rename the file"
        )
    return match.group(1)


def pattern_grouping(pattern: str | None, unit: str, note: str) -> dict:
    """The manifest's account of groups taken from file names by a regex, or, without a
    pattern, of one group per `unit` (image, video, file) with `note` saying what that risks."""
    if pattern is None:
        return {"mode": f"per_{unit}", "pattern": None, "note": note}
    return {"mode": "pattern", "pattern": pattern, "applied_to": "file stem, first capture group"}


SOURCES: dict[str, Callable[..., Source]] = {}


def register_source(name: str):
    def decorate(cls):
        SOURCES[name] = cls
        cls.format_name = name
        return cls

    return decorate


def open_source(format_name: str, root, **options) -> Source:
    """The registered source `format_name` over `root`; options go to its constructor."""
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
        raise UserError(
            f"{what} '{pattern}' has no capture group; wrap the id in parentheses, e.g. 'patient_(\\d+)'"
        )
    return rx


# ---------------------------------------------------------------------------- image folder
@register_source("imagefolder")
class ImageFolderSource(Source):
    """`root/<class name>/**/<image>`: each first-level folder is a class (sorted names give
    labels 0..n-1); images may sit in nested folders below it.

    group_pattern: regex whose first capture group, searched in the file stem, is the group
    (e.g. patient) id; without it every image is its own group. exclude_pattern: regex; files
    whose stem matches are not images of the set (default: segmentation masks, '_mask').
    """

    looks_for: ClassVar[str] = (
        "images (" + ", ".join(IMAGE_SUFFIXES) + ") in one subfolder per class: <root>/<class name>/<image>.png"
    )

    @classmethod
    def looks_like(cls, root: Path) -> bool:
        """A folder whose non-hidden subfolders hold at least one image file (at any depth)."""
        root = Path(root)
        if not root.is_dir():
            return False
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for dirpath, dirnames, filenames in os.walk(sub):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                if any(_is_image(n) and not n.startswith(".") for n in filenames):
                    return True
        return False

    def __init__(self, root, group_pattern: str | None = None, exclude_pattern: str | None = DEFAULT_EXCLUDE):
        self.root = Path(root).expanduser().absolute()
        self.group_pattern = group_pattern
        self.exclude_pattern = exclude_pattern
        self._group_rx = compile_pattern(group_pattern, "group pattern", need_group=True)
        self._exclude_rx = compile_pattern(exclude_pattern, "exclude pattern", need_group=False)
        self._items, self._stats, self.classes = self._scan()

    def _scan(self) -> tuple[list[ImageFileItem], dict, list[str]]:
        root = self.root
        how = f"put images in one subfolder per class: {root}/<class name>/<image>.png"
        if not root.exists():
            raise UserError(f"source folder {root} does not exist; check the path ({how})")
        if not root.is_dir():
            raise UserError(f"source {root} is not a folder; {how}")
        top_images = sorted(p.name for p in root.iterdir() if p.is_file() and _is_image(p.name))
        if top_images:
            raise UserError(
                f"{len(top_images)} image(s) sit directly in {root} (e.g. {top_images[0]!r}) without a class "
                f"folder; {how}"
            )
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        found: list[tuple[str, str, Path]] = []  # (class, relative path, path)
        excluded = ignored = 0
        for class_dir in class_dirs:
            for dirpath, dirnames, filenames in os.walk(class_dir):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    if not _is_image(name):
                        ignored += 1
                        continue
                    path = Path(dirpath) / name
                    if self._exclude_rx is not None and self._exclude_rx.search(path.stem):
                        excluded += 1
                        continue
                    found.append((class_dir.name, path.relative_to(root).as_posix(), path))
        if not found:
            raise UserError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) found in class subfolders of {root}"
                f" ({len(class_dirs)} subfolder(s), {excluded} excluded by {self.exclude_pattern!r}, "
                f"{ignored} other files); {how}"
            )
        class_names = sorted({c for c, _, _ in found})
        labels = {c: i for i, c in enumerate(class_names)}
        items = [
            ImageFileItem(
                key=make_key(rel),
                source=rel,
                label=labels[cls],
                class_name=cls,
                group=group_from_pattern(self._group_rx, self.group_pattern, rel, path, "file"),
                path=path,
            )
            for cls, rel, path in found
        ]
        stats = {
            "images_found": len(items),
            "excluded": excluded,
            "exclude_pattern": self.exclude_pattern,
            "non_image_files": ignored,
            "empty_class_folders": [d.name for d in class_dirs if d.name not in labels],
        }
        return items, stats, class_names

    def grouping(self) -> dict:
        return pattern_grouping(self.group_pattern, "image", "no group_pattern given: each image is its own group, "
                                "so images of one patient or video can fall on both sides of a split")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)
