"""Phase 1 of a build, for one item: load, convert, preprocess and encode every frame, and
keep the result in a result file.

`process_item` turns colour into grayscale (small colour overlays inpainted, large ones
flagged: `overlay.py`), preprocesses (region, crop, stretch, resize) and PNG-encodes each
frame; failures are part of the result, never exceptions. `write_result` stores it
atomically (temporary name, rename) as one file under `OUT/.work/items/` (`workdir.py`
names the file), which `read_result` checks when a rerun reuses it. `run_batch` is what a
worker process runs (`process.py` schedules it).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usjepa.shardset import sample as sample_format
from usjepa.ingest.overlay import OverlaySettings, to_gray
from usjepa.ingest.preprocess import PreprocessError, PreprocessSettings, preprocess
from usjepa.ingest.sources import SourceItem

WORK_FORMAT = 1  # bump when a result file's content or meaning changes
RESULT_MAGIC = b"USJWRES1"
_FIXED = struct.Struct("<IIQ")  # header length, header crc32, payload length


@dataclass(frozen=True)
class ItemSettings:
    """Everything that changes the result of one item (what a worker needs)."""

    preprocess: PreprocessSettings
    overlay: OverlaySettings


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


def write_result(path: Path, header: dict, payload: bytes) -> int:
    """Write a result file atomically (temporary name, rename); returns the payload's offset.

    Layout: magic, (header length, header crc32, payload length), header JSON, payload. No
    fsync per file: a killed process leaves whole files (the rename is atomic); after a
    power loss a damaged file fails its length or crc check and is simply redone."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(RESULT_MAGIC + _FIXED.pack(len(head), zlib.crc32(head), len(payload)))
        f.write(head)
        f.write(payload)
    os.replace(tmp, path)
    return len(RESULT_MAGIC) + _FIXED.size + len(head)


def read_result(path: Path) -> tuple[dict, int] | None:
    """(header, payload offset) of a complete, intact result file; None when it is missing
    or damaged (a damaged one is deleted so it is redone)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        fixed = f.read(len(RESULT_MAGIC) + _FIXED.size)
        ok = len(fixed) == len(RESULT_MAGIC) + _FIXED.size and fixed.startswith(RESULT_MAGIC)
        if ok:
            head_len, head_crc, payload_len = _FIXED.unpack(fixed[len(RESULT_MAGIC) :])
            head = f.read(head_len)
            base = len(fixed) + head_len
            ok = (
                len(head) == head_len
                and zlib.crc32(head) == head_crc
                and os.fstat(f.fileno()).st_size == base + payload_len
            )
    if not ok:
        path.unlink(missing_ok=True)
        return None
    return json.loads(head), base


def run_batch(tasks: list[tuple[SourceItem, str]], settings: ItemSettings) -> list[tuple[dict, int]]:
    """Worker entry point: process items and write their result files."""
    out = []
    for item, path in tasks:
        header, payload = process_item(item, settings)
        out.append((header, write_result(Path(path), header, payload)))
    return out
