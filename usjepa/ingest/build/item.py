"""Phase 1 for one item: load, convert to grayscale (colour overlays inpainted or flagged),
preprocess and PNG-encode every frame; failures are part of the result, never exceptions."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from usjepa.ingest.build.workdir import write_result
from usjepa.ingest.image.overlay import to_gray
from usjepa.ingest.image.preprocess import PreprocessError, preprocess
from usjepa.ingest.settings import ItemSettings
from usjepa.ingest.sources.base import SourceItem
from usjepa.shardset import sample as sample_format


def _normalise_pixels(image) -> tuple[np.ndarray | None, str | None]:
    """(uint8 (H, W) or (H, W, 3), None) from what a source returned, or (None, problem)."""
    if not isinstance(image, np.ndarray):
        return None, f"expected a numpy array, got {type(image).__name__}"
    if image.dtype != np.uint8:
        return None, f"expected uint8 pixels, got {image.dtype}"
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    elif image.ndim == 3 and image.shape[2] == 4:  # RGBA: alpha dropped
        image = image[..., :3]
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3):
        return np.ascontiguousarray(image), None
    return None, f"expected (H, W) or (H, W, 3) pixels, got shape {image.shape}"


def _process_frame(loaded, settings: ItemSettings) -> tuple[dict, list[bytes] | None]:
    info = dict(loaded.info or {})
    frame = info.get("frame")
    entry: dict = {"frame": None if frame is None else int(frame)}
    image, problem = _normalise_pixels(loaded.image)
    if problem is not None:
        entry.update(status="failed", stage="read", reason=f"unsupported pixels from the source: {problem}")
        return entry, None
    gray, overlay_info = to_gray(image, settings.overlay)
    try:
        out = preprocess(gray, settings.preprocess, loaded.region)
    except PreprocessError as exc:
        entry.update(status="failed", stage="preprocess", reason=str(exc))
        return entry, None
    digest = sample_format.pixel_hash(out.image)
    meta = {
        **info,
        **overlay_info,
        **out.info,
        "pixel_hash": digest,
        "region_source": "detected" if loaded.region is None else "source",
    }
    image_png, region_png = sample_format.encode_pixels(out.image, out.region)
    entry.update(
        status="ok",
        hash=digest,
        color_fraction=overlay_info["color_fraction"],
        inpainted=overlay_info["inpainted"],
        flagged=overlay_info["overlay_flagged"],
    )
    return entry, [image_png, region_png, sample_format.encode_meta(meta)]


def process_item(item: SourceItem, settings: ItemSettings) -> tuple[dict, bytes]:
    """Load, convert, preprocess and encode every frame of one item: (header, payload).

    The header lists the frames (status ok / failed with stage and reason; for ok frames
    the pixel hash, overlay facts, and where its three members lie in the payload) and an
    item-level `error` when reading stopped (the frames read before are kept). Anything the
    source raises is an unreadable input; errors in the preprocessing other than
    PreprocessError are bugs and propagate."""
    header: dict = {"key": item.key, "error": None, "frames": []}
    chunks: list[bytes] = []
    offset = 0
    count = 0
    try:
        frames = iter(item.frames())
    except Exception as exc:  # noqa: BLE001  (corrupt, truncated, unsupported: never stop the build)
        frames = None
        header["error"] = f"unreadable: {type(exc).__name__}: {exc}"
    while frames is not None:
        try:
            loaded = next(frames)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001
            after = f" (after {count} frame(s))" if count else ""
            header["error"] = f"unreadable: {type(exc).__name__}: {exc}{after}"
            break
        count += 1
        entry, blobs = _process_frame(loaded, settings)
        if blobs is not None:
            data = b"".join(blobs)
            entry.update(offset=offset, sizes=[len(b) for b in blobs], crc=zlib.crc32(data))
            chunks.append(data)
            offset += len(data)
        header["frames"].append(entry)
    if header["error"] is None and count == 0:
        header["error"] = "unreadable: the item holds no image (no frames)"
    return header, b"".join(chunks)


def run_batch(tasks: list[tuple[SourceItem, str]], settings: ItemSettings) -> list[tuple[dict, int]]:
    """Worker entry point: process items and write their result files."""
    out = []
    for item, path in tasks:
        header, payload = process_item(item, settings)
        out.append((header, write_result(Path(path), header, payload)))
    return out
