"""Image files as uint8 arrays: grayscale (H, W), or RGB (H, W, 3) when they hold colour."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from usjepa.ingest.image.overlay import colour_fraction, gray_if_uncoloured
from usjepa.ingest.sources.base import Loaded, SourceItem

_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _scaled(img: Image.Image) -> np.ndarray:
    """16-bit and float pixels scaled linearly from [min(0, lo), hi] to 0-255."""
    arr = np.asarray(img).astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("image holds non-finite pixel values")
    lo, hi = min(0.0, float(arr.min())), float(arr.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint((arr - lo) * scale), 0, 255).astype(np.uint8)


def pil_to_array(img: Image.Image) -> tuple[np.ndarray, dict]:
    """PIL image -> (uint8 array, info), keeping colour; gray stored as RGB comes back (H, W),
    losslessly; alpha dropped; EXIF orientation applied."""
    img = ImageOps.exif_transpose(img)
    info = {"orig_mode": img.mode, "orig_size": [img.width, img.height]}
    mode = img.mode
    if mode == "L":
        return np.asarray(img), info
    if mode in _HIGH_DEPTH_MODES:
        return _scaled(img), info
    if mode in ("LA", "1"):
        return np.asarray(img.getchannel("L") if mode == "LA" else img.convert("L")), info
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return gray_if_uncoloured(np.asarray(rgb)), info


def pil_to_gray(img: Image.Image) -> tuple[np.ndarray, dict]:
    """PIL image -> (uint8 (H, W), info) for callers that want grayscale at once: colour
    becomes ITU-R 601-2 luma (PIL's "L"), with its colour fraction recorded."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("L", "LA", *_HIGH_DEPTH_MODES):
        return pil_to_array(img)
    info = {"orig_mode": img.mode, "orig_size": [img.width, img.height]}
    rgb = img.convert("RGB")
    info["color_fraction"] = round(colour_fraction(np.asarray(rgb)), 4)
    return np.asarray(rgb.convert("L")), info


def load_image(path: Path) -> tuple[np.ndarray, dict]:
    """Decode an image file fully (truncated or corrupt files raise), keeping colour."""
    with Image.open(path) as img:
        img.load()
        return pil_to_array(img)


@dataclass(frozen=True)
class ImageFileItem(SourceItem):
    path: Path = field(default=Path(), compare=False)

    def load(self) -> Loaded:
        image, info = load_image(self.path)
        return Loaded(image, None, info)
