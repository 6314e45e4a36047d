"""Ultrasound-region detection: which pixels hold the scan (fan, sector or rectangle), not the
borders, text, calipers and logos around it (docs/data.md#preprocessing). Pure functions on
arrays; sizes are fractions of the image so one setting serves every resolution."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class RegionSettings:
    """How `detect_region` finds the ultrasound region (recorded in the manifest; docs/data.md#preprocessing)."""

    threshold: float = 1.0
    """Signal = (box-averaged) value above the background level plus this (0-255 scale).
    The background level is the 1st intensity percentile, capped at `max_background`, so an
    image with no border at all is not thresholded on its own dark anatomy."""
    max_background: float = 8.0
    work_size: int = 128  # detect on the image box-reduced by an integer factor to about this shorter side
    close_fraction: float = 0.04  # side of the square closing element, a fraction of the shorter side
    open_fraction: float = 0.02  # side of the square opening element: removes structures thinner than this
    keep_fraction: float = 0.25
    """Components at least this fraction of the largest one are kept too (the hull then
    joins them): a dark band right across the scan (a large cyst, a shadow) splits it in
    two. 1.0 keeps only the largest."""
    fill_holes: bool = True
    convex_hull: bool = True
    min_area_fraction: float = 0.02  # a smaller share of the image counts as no region (image skipped)


def _odd_size(fraction: float, shape: tuple[int, ...]) -> int:
    """Odd filter width of `fraction` of the shorter side; 1 (no filtering) when below 2."""
    size = int(round(fraction * min(shape)))
    return size | 1 if size >= 2 else 1


def _close(mask: np.ndarray, size: int) -> np.ndarray:
    # Grey max/min filters on a 0/1 array are separable (fast), and mode="nearest" keeps a
    # region that touches the image border from being eaten the way binary_erosion would.
    m = mask.view(np.uint8)
    return ndimage.minimum_filter(ndimage.maximum_filter(m, size, mode="nearest"), size, mode="nearest") > 0


def _open(mask: np.ndarray, size: int) -> np.ndarray:
    m = mask.view(np.uint8)
    return ndimage.maximum_filter(ndimage.minimum_filter(m, size, mode="nearest"), size, mode="nearest") > 0


def largest_components(mask: np.ndarray, keep_fraction: float = 1.0) -> np.ndarray:
    """The largest 8-connected component of a boolean mask, plus every other component at
    least `keep_fraction` of its size; all False when the mask is."""
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= max(1.0, keep_fraction * sizes.max())
    return keep[labels]


def hull_polygon(mask: np.ndarray) -> np.ndarray | None:
    """Vertices (x, y) of the convex hull of a boolean mask's pixel centres; None when the
    mask has fewer than three non-collinear pixels."""
    # Every pixel lies between the leftmost and rightmost pixel of its row, so those row
    # extremes have the same hull as the whole mask, at a fraction of the points.
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    sub = mask[rows]
    left = np.argmax(sub, axis=1)
    right = mask.shape[1] - 1 - np.argmax(sub[:, ::-1], axis=1)
    wide = right != left  # one point for a row holding a single pixel (np.unique is slower)
    points = np.concatenate([np.column_stack([left, rows]), np.column_stack([right[wide], rows[wide]])]).astype(
        np.float64
    )
    if len(points) < 3:
        return None
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:  # all points on a line
        return None


def fill_polygon(vertices: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of `shape` with the polygon (x, y vertices, pixel units) filled."""
    canvas = Image.new("1", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(v) for v in vertices], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def _upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    img = Image.fromarray(mask.view(np.uint8) * np.uint8(255))
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127


def detect_region(image: np.ndarray, settings: RegionSettings = RegionSettings()) -> np.ndarray:
    """Boolean mask (same HxW as `image`, uint8 grayscale) of the ultrasound region.

    All False when nothing stands out from the background; whether a region is too small to
    use is the caller's decision (`RegionSettings.min_area_fraction`).
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"detect_region expects uint8 HxW grayscale, got {image.dtype} {image.shape}")
    factor = max(1, min(image.shape) // max(1, settings.work_size))
    small = np.asarray(Image.fromarray(image).reduce(factor)) if factor > 1 else image
    counts = np.bincount(small.ravel(), minlength=256)
    first_percentile = int(np.searchsorted(np.cumsum(counts), 0.01 * small.size))
    background = min(float(first_percentile), settings.max_background)
    return shape_region(small > background + settings.threshold, image.shape, settings, factor)


def shape_region(mask: np.ndarray, shape: tuple[int, int], settings: RegionSettings, scale) -> np.ndarray:
    """The full-resolution (`shape`) region from a work-size mask of signal pixels: opening,
    the largest component(s), closing, holes filled, convex hull; `scale`: full / work size."""
    # Open first: it deletes thin text, caliper lines and the bridges that join them to the
    # scan; choosing components before closing means the closing cannot bridge them back.
    opening = _odd_size(settings.open_fraction, mask.shape)
    if opening > 1:
        mask = _open(mask, opening)
    mask = largest_components(mask, settings.keep_fraction)
    if not mask.any():
        return np.zeros(shape, dtype=bool)
    close = _odd_size(settings.close_fraction, mask.shape)
    if close > 1:
        mask = _close(mask, close)
    if settings.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    full = _upsample(mask, shape)
    if settings.convex_hull:
        vertices = hull_polygon(mask)
        if vertices is not None:
            # pixel centre of a reduced pixel -> centre of the block it averages
            full = full | fill_polygon((vertices + 0.5) * scale - 0.5, shape)
    return full


def region_bbox(region: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the mask's bounding box, end-exclusive; None if empty."""
    rows = np.flatnonzero(region.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(region.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
