"""Ultrasound preprocessing on uint8 grayscale arrays: region, crop, percentile stretch inside
the region, resize (docs/data.md#preprocessing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image

from usjepa.ingest.image.region import RegionSettings, detect_region, region_bbox

RESIZE_MODES = ("pad", "stretch", "short_side")
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}
MIN_INPUT_SIDE = 16


class PreprocessError(ValueError):
    """This image cannot be preprocessed (blank, no region, too small): skip it."""


@dataclass(frozen=True)
class PreprocessSettings:
    image_size: int = 224
    low_percentile: float = 2.0
    high_percentile: float = 98.0
    resize_mode: str = "pad"
    """'pad': zero-pad the crop to a square first (keeps the aspect ratio, so shapes such as
    'taller than wide' survive); 'stretch': resize the crop straight to the square."""
    interpolation: str = "bicubic"
    region: RegionSettings = field(default_factory=RegionSettings)


class Preprocessed(NamedTuple):
    image: np.ndarray  # uint8 (S, S)
    region: np.ndarray  # bool (S, S), non-empty
    info: dict  # crop box in input pixels, region fraction, percentile values


def region_percentiles(image: np.ndarray, region: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The `low` and `high` percentiles of the uint8 values inside `region`, from a 256-bin
    histogram (numpy's 'inverted_cdf' definition; ~10x faster than np.percentile here)."""
    counts = np.bincount(image[region], minlength=256)
    total = int(counts.sum())
    if total == 0:
        raise PreprocessError("the ultrasound region is empty")
    cdf = np.cumsum(counts)
    lo, hi = np.searchsorted(cdf, [low / 100 * total, high / 100 * total], side="left")
    return float(min(lo, 255)), float(min(hi, 255))


def stretch_percentiles(
    image: np.ndarray, region: np.ndarray, low: float = 2.0, high: float = 98.0
) -> tuple[np.ndarray, tuple[float, float]]:
    """Map the [low, high] percentile of the pixels INSIDE `region` linearly to 0-255.

    Pixels outside the region become 0. A flat region (high == low) is left unstretched.
    Returns the new uint8 image and the (low, high) values used.
    """
    lo, hi = region_percentiles(image, region, low, high)
    if hi - lo < 1.0:
        out = image.copy()
    else:
        # A 256-entry lookup table: exact for uint8 input and cheaper than float maths per pixel.
        lut = np.clip(np.rint((np.arange(256, dtype=np.float32) - lo) * (255.0 / (hi - lo))), 0, 255)
        out = lut.astype(np.uint8)[image]
    out[~region] = 0
    return out, (lo, hi)


def pad_to_square(image: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad (centred) image and mask to a square; the padding is outside the region."""
    h, w = image.shape
    side = max(h, w)
    if h == w:
        return image, region
    top, left = (side - h) // 2, (side - w) // 2
    out_img = np.zeros((side, side), dtype=image.dtype)
    out_reg = np.zeros((side, side), dtype=bool)
    out_img[top : top + h, left : left + w] = image
    out_reg[top : top + h, left : left + w] = region
    return out_img, out_reg


def output_shape(shape: tuple[int, int], size: int, mode: str) -> tuple[int, int]:
    """(height, width) after resizing: size x size, or the shorter side to `size` keeping the
    aspect ratio (`short_side`, so the training crops see undistorted anatomy)."""
    if mode != "short_side":
        return size, size
    h, w = shape
    scale = size / min(h, w)
    return max(size, round(h * scale)), max(size, round(w * scale))


def resize_square(
    image: np.ndarray, region: np.ndarray, size: int, mode: str = "pad", interpolation: str = "bicubic"
) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (with `interpolation`) and mask (nearest) per `mode` (see RESIZE_MODES and
    `output_shape`); zero the outside."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    if mode == "pad":
        image, region = pad_to_square(image, region)
    h, w = output_shape(image.shape, size, mode)
    if image.shape != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), INTERPOLATIONS[interpolation]))
        mask_img = Image.fromarray(region.view(np.uint8) * np.uint8(255))
        region = np.asarray(mask_img.resize((w, h), Image.Resampling.NEAREST)) > 127
    image = np.where(region, image, np.uint8(0))
    return image, region


def preprocess(image: np.ndarray, settings: PreprocessSettings, region: np.ndarray | None = None) -> Preprocessed:
    """The whole chain for one uint8 grayscale image; `region` overrides detection when given."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"preprocess expects uint8 HxW grayscale, got {image.dtype} {image.shape}")
    h, w = image.shape
    if min(h, w) < MIN_INPUT_SIDE:
        raise PreprocessError(f"image is {w}x{h} px; at least {MIN_INPUT_SIDE} px per side is needed")
    if region is None:
        region = detect_region(image, settings.region)
    elif region.shape != image.shape:
        raise PreprocessError(f"region mask shape {region.shape} differs from image shape {image.shape}")
    region = region.astype(bool, copy=False)
    fraction = float(region.mean())
    if fraction < settings.region.min_area_fraction:
        if fraction == 0.0:
            raise PreprocessError("no ultrasound region found (image blank or below the threshold)")
        raise PreprocessError(
            f"ultrasound region covers {fraction:.1%} of the image, below the minimum "
            f"{settings.region.min_area_fraction:.1%}"
        )
    top, bottom, left, right = region_bbox(region)  # not None: the region is not empty
    crop, crop_region = image[top:bottom, left:right], region[top:bottom, left:right]
    stretched, (lo, hi) = stretch_percentiles(crop, crop_region, settings.low_percentile, settings.high_percentile)
    out, out_region = resize_square(
        stretched, crop_region, settings.image_size, settings.resize_mode, settings.interpolation
    )
    if not out_region.any():
        raise PreprocessError("the ultrasound region vanished when resized (too thin)")
    info = {
        "crop_box": [left, top, right, bottom],  # PIL order
        "region_fraction": round(fraction, 4),
        "stretch": [lo, hi],
    }
    return Preprocessed(out, out_region, info)
