"""How one sample is stored in a shard, the one place that knows it: `<key>.png` (the image,
8-bit grayscale), `<key>.region.png` (0 outside the region, 255 inside), `<key>.json` (label,
class_name, group, source, split, provenance); docs/data.md#shard-format."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

IMAGE_EXT = "png"
REGION_EXT = "region.png"
META_EXT = "json"
REQUIRED_META = ("label", "class_name", "group", "source", "split")
# Written by the builder since issue 3 (older shard sets may lack them; readers use .get):
# frame, color_fraction, inpainted, overlay_flagged, pixel_hash, region_source, plus
# provenance (orig_mode, orig_size, crop_box, region_fraction, stretch).
BUILD_META = ("color_fraction", "inpainted", "overlay_flagged", "pixel_hash", "region_source")

_KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9]+")


def make_key(relative_path: str, max_len: int = 80) -> str:
    """A stable, unique, tar- and WebDataset-safe key for a source path.

    Readable part (the path with anything but letters and digits folded to '_') plus 10 hex
    digits of the path's SHA-1, so paths that fold to the same text stay distinct.
    """
    readable = _UNSAFE.sub("_", str(PurePosixPath(relative_path).with_suffix("")))
    readable = readable.strip("_")[:max_len] or "sample"
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:10]
    return f"{readable}-{digest}"


def frame_key(item_key: str, frame: int | None) -> str:
    """Sample key of one frame of an item: the item's key for a single image, else
    `<item key>_f<frame, 5 digits>` (frames of a cine loop or a multi-frame DICOM)."""
    return item_key if frame is None else f"{item_key}_f{int(frame):05d}"


def pixel_hash(image: np.ndarray) -> str:
    """Content hash of preprocessed pixels (shape + bytes; 128-bit BLAKE2b, hex): identical
    images have the same hash, whatever file or source they came from."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((image.dtype.str, image.shape)).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png_gray(array: np.ndarray, predict: bool = True) -> bytes:
    """8-bit grayscale PNG of a uint8 HxW array, written directly (numpy + zlib).

    PNG filter 1 ('Sub', each pixel minus its left neighbour) on every row when `predict`,
    else filter 0; zlib level 1 with the run-length strategy. About 2.3x faster to encode
    than PIL at the same settings (PIL tries all five filters per row), about the same size
    on ultrasound speckle (+3%), and faster to decode. Binary masks use predict=False.
    """
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"encode_png_gray expects uint8 HxW, got {array.dtype} {array.shape}")
    h, w = array.shape
    raw = np.empty((h, w + 1), np.uint8)
    if predict and w > 1:
        raw[:, 0] = 1
        raw[:, 1] = array[:, 0]
        np.subtract(array[:, 1:], array[:, :-1], out=raw[:, 2:])  # uint8 wrap-around = mod 256
    else:
        raw[:, 0] = 0
        raw[:, 1:] = array
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = compressor.compress(raw.data) + compressor.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, PurePosixPath)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"metadata value {value!r} ({type(value).__name__}) is not JSON serialisable")


def encode_meta(meta: dict) -> bytes:
    """The canonical JSON bytes of a sample's metadata (sorted keys, compact; numpy scalars
    and arrays become plain numbers and lists)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), default=_json_default).encode("utf-8")


def encode_pixels(image: np.ndarray, region: np.ndarray) -> tuple[bytes, bytes]:
    """PNG bytes of the image and of its region mask (0 outside, 255 inside)."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image must be uint8 HxW grayscale, got {image.dtype} {image.shape}")
    if region.shape != image.shape:
        raise ValueError(f"region shape {region.shape} differs from image shape {image.shape}")
    mask = np.where(region.astype(bool, copy=False), np.uint8(255), np.uint8(0))
    return encode_png_gray(image), encode_png_gray(mask, predict=False)


def assemble_sample(key: str, image_png: bytes, region_png: bytes, meta: dict) -> dict:
    """A dict for `webdataset.TarWriter(..., encoder=False)` from already encoded members."""
    if not _KEY_OK.match(key):
        raise ValueError(f"sample key {key!r} must match [A-Za-z0-9_-]+")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"sample {key}: metadata lacks {missing}")
    return {"__key__": key, IMAGE_EXT: image_png, REGION_EXT: region_png, META_EXT: encode_meta(meta)}


def encode_sample(key: str, image: np.ndarray, region: np.ndarray, meta: dict) -> dict:
    """A dict for `webdataset.TarWriter(..., encoder=False)`: key plus bytes per member."""
    if not _KEY_OK.match(key):
        raise ValueError(f"sample key {key!r} must match [A-Za-z0-9_-]+")
    try:
        image_png, region_png = encode_pixels(image, region)
    except ValueError as exc:
        raise ValueError(f"sample {key}: {exc}") from None
    return assemble_sample(key, image_png, region_png, meta)


def _decode_png(data, what: str, key: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.load()
            if img.mode != "L":
                raise ValueError(f"mode {img.mode}, expected 8-bit grayscale (L)")
            return np.asarray(img)
    except Exception as exc:  # PIL raises several types for corrupt data
        raise ValueError(f"sample {key}: corrupt {what}: {exc}") from exc


def decode_sample(sample: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Raw WebDataset sample (bytes under 'png', 'region.png', 'json') ->
    (image uint8 HxW, region bool HxW, meta dict). ValueError naming the key if corrupt."""
    key = sample.get("__key__", "<no key>")
    for ext in (IMAGE_EXT, REGION_EXT, META_EXT):
        if ext not in sample:
            raise ValueError(f"sample {key}: member .{ext} missing (has {sorted(k for k in sample if k[0] != '_')})")
    image = _decode_png(sample[IMAGE_EXT], "image", key)
    region = _decode_png(sample[REGION_EXT], "region mask", key) > 127
    if region.shape != image.shape:
        raise ValueError(f"sample {key}: region shape {region.shape} differs from image shape {image.shape}")
    try:
        meta = json.loads(bytes(sample[META_EXT]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"sample {key}: corrupt metadata JSON: {exc}") from exc
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META):
        raise ValueError(f"sample {key}: metadata must be an object with {list(REQUIRED_META)}")
    return image, region, meta
