"""Colour overlays (Doppler boxes, calipers, text drawn in colour): the one colour detector,
inpainting of small overlays, flagging of large ones, grayscale out (docs/data.md#colour-overlays)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from usjepa.ingest.ranges import range_problems

LARGE_OVERLAY_ACTIONS = ("flag", "skip")


@dataclass(frozen=True)
class OverlaySettings:
    """How colour overlays are handled (recorded in the manifest; docs/data.md#colour-overlays)."""

    tolerance: int = 16  # coloured: max(R, G, B) - min(R, G, B) > tolerance
    max_fraction: float = 0.05  # inpaint below this coloured share, else flag
    dilate: int = 1  # pixels (8-connected) the coloured pixels grow by before inpainting
    iterations: int = 40  # Jacobi sweeps of the harmonic fill

    def problems(self) -> list[str]:
        rules = {"tolerance": "integer in [0, 255]", "max_fraction": "number in [0, 1]"}
        return range_problems(self, {**rules, "dilate": "integer >= 0", "iterations": "integer >= 0"}, "overlay ")


def colour_mask(rgb: np.ndarray, tolerance: int = 16) -> np.ndarray:
    """Boolean (H, W): pixels of a uint8 (H, W, 3) image whose channel spread (max - min) exceeds `tolerance`."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"colour_mask expects uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
    hi = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    lo = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    return (hi - lo) > tolerance


def colour_fraction(rgb: np.ndarray, tolerance: int = 16) -> float:
    """Share of coloured pixels (`colour_mask`)."""
    return float(colour_mask(rgb, tolerance).mean())


def gray_if_uncoloured(rgb: np.ndarray) -> np.ndarray:
    """(H, W) when the three channels are equal everywhere (gray stored as colour), else `rgb`: lossless."""
    if colour_mask(rgb, 0).any():
        return rgb
    return np.ascontiguousarray(rgb[..., 0])


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma (PIL's "L" conversion: 0.299 R + 0.587 G + 0.114 B), uint8 (H, W)."""
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"))


def inpaint(gray: np.ndarray, hole: np.ndarray, iterations: int = 40) -> np.ndarray:
    """Fill the `hole` pixels of a uint8 (H, W) image from their surroundings (harmonic fill:
    nearest known value, then Jacobi sweeps of the 8-neighbour mean; known pixels fixed).
    Returns a new uint8 image; the image unchanged when the hole is empty or covers it all."""
    if not hole.any() or hole.all():
        return gray.copy()
    rows = np.flatnonzero(hole.any(axis=1))
    cols = np.flatnonzero(hole.any(axis=0))
    top, bottom = max(rows[0] - 1, 0), min(rows[-1] + 2, gray.shape[0])
    left, right = max(cols[0] - 1, 0), min(cols[-1] + 2, gray.shape[1])
    box_hole = hole[top:bottom, left:right]
    work = gray[top:bottom, left:right].astype(np.float32)
    if box_hole.all():  # the hole's bounding box has no known pixel: use the whole image
        top, bottom, left, right = 0, gray.shape[0], 0, gray.shape[1]
        box_hole, work = hole, gray.astype(np.float32)
    # nearest known pixel for every hole pixel
    _, (iy, ix) = ndimage.distance_transform_edt(box_hole, return_indices=True)
    work = work[iy, ix]
    # Jacobi sweeps on the hole pixels only: a flat gather of their 8 neighbours (the box is
    # padded by one replicated pixel, so every hole pixel has 8)
    padded = np.pad(work, 1, mode="edge")
    flat = padded.ravel()
    width = padded.shape[1]
    holes = np.flatnonzero(np.pad(box_hole, 1))
    offsets = np.array([-width - 1, -width, -width + 1, -1, 1, width - 1, width, width + 1])
    neighbours = holes[:, None] + offsets
    for _ in range(iterations):
        flat[holes] = flat[neighbours].mean(axis=1)
    out = gray.copy()
    out[top:bottom, left:right][box_hole] = np.clip(np.rint(padded[1:-1, 1:-1][box_hole]), 0, 255).astype(np.uint8)
    return out


def to_gray(image: np.ndarray, settings: OverlaySettings = OverlaySettings()) -> tuple[np.ndarray, dict]:
    """Grayscale (H, W) uint8 from a source image (H, W) or (H, W, 3), plus per-sample info:
    color_fraction (share of coloured pixels, 4 decimals), inpainted, overlay_flagged."""
    if image.ndim == 2:
        return image, {"color_fraction": 0.0, "inpainted": False, "overlay_flagged": False}
    mask = colour_mask(image, settings.tolerance)
    fraction = float(mask.mean())
    gray = luma(image)
    info = {"color_fraction": round(fraction, 4), "inpainted": False, "overlay_flagged": False}
    if fraction == 0.0:
        return gray, info
    if fraction >= settings.max_fraction:
        info["overlay_flagged"] = True
        return gray, info
    if settings.dilate > 0:
        mask = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=settings.dilate)
    info["inpainted"] = True
    return inpaint(gray, mask, settings.iterations), info
