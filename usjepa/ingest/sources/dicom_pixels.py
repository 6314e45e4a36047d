"""DICOM files as images: headers without pixels for listing, then pixel data decoded one
frame at a time to uint8 gray or RGB (docs/data.md#sources, "dicom")."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from usjepa.ingest.image.overlay import gray_if_uncoloured
from usjepa.ingest.sources import deid
from usjepa.ingest.sources.base import Loaded, SourceItem

PREAMBLE = 128
MAGIC = b"DICM"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index, not an image
COLOUR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")


def is_dicom_file(path) -> bool:
    """Whether `path` starts with the DICOM File Format's 128-byte preamble + 'DICM'."""
    try:
        with open(path, "rb") as f:
            head = f.read(PREAMBLE + len(MAGIC))
    except OSError:
        return False
    return head[PREAMBLE:] == MAGIC


def read_header(path: Path):
    import pydicom

    with warnings.catch_warnings():  # pydicom's value warnings may quote identifying values
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


class DicomDecodeError(ValueError):
    """This DICOM item cannot be turned into an image (the writer skips it with this reason)."""


def _decoder_problem(ts) -> str | None:
    """Why pixel data in transfer syntax `ts` cannot be decoded here, or None."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    if ts in uid.MPEGTransferSyntaxes:
        return (
            f"{ts.name} (video) pixel data is not decoded by pydicom; export the cine as MP4/frames "
            "and use a video or image source"
        )
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return (
            f"no pixel data decoder exists for transfer syntax {ts.name} ({ts}); convert the file "
            "(e.g. dcmdjpeg/gdcmconv)"
        )
    if decoder.is_available:
        return None
    if ts in ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"):
        how = (
            "High-Throughput JPEG 2000 pixel data needs pylibjpeg-openjpeg >= 2: "
            "pip install pylibjpeg pylibjpeg-openjpeg"
        )
    elif ts in uid.JPEG2000TransferSyntaxes:
        how = (
            "JPEG 2000 pixel data needs pylibjpeg-openjpeg or Pillow with openjpeg: "
            "pip install pylibjpeg pylibjpeg-openjpeg"
        )
    elif ts in uid.JPEGLSTransferSyntaxes:
        how = "JPEG-LS pixel data needs pyjpegls or pylibjpeg-libjpeg: pip install pyjpegls"
    elif ts in uid.JPEGTransferSyntaxes:
        how = f"{ts.name} pixel data needs pylibjpeg-libjpeg (or python-gdcm): pip install pylibjpeg pylibjpeg-libjpeg"
    elif ts in uid.RLETransferSyntaxes:
        how = "RLE pixel data needs numpy (pydicom's own decoder) or pylibjpeg-rle: pip install pylibjpeg pylibjpeg-rle"
    else:
        how = f"{ts.name} pixel data needs one of: {'; '.join(decoder.missing_dependencies) or 'an extra decoder'}"
    return how


def _functional_group(ds, frame: int, sequence: str):
    """The item of functional-group `sequence` that applies to `frame` (per-frame first,
    then shared), or None (enhanced multi-frame files keep VOI/rescale there)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq and len(seq) > index and seq[index].get(sequence):
            return seq[index].get(sequence)[0]
    return None


def _first(value) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _rescale(arr: np.ndarray, ds, frame: int) -> np.ndarray:
    src = (
        ds
        if "RescaleSlope" in ds or "RescaleIntercept" in ds
        else _functional_group(ds, frame, "PixelValueTransformationSequence")
    )
    if src is None:
        return arr
    slope = _first(src.get("RescaleSlope", 1) or 1)
    intercept = _first(src.get("RescaleIntercept", 0) or 0)
    if slope == 1 and intercept == 0:
        return arr
    return arr.astype(np.float64) * slope + intercept


def _window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 VOI windowing to [0, 1]."""
    x = x.astype(np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / max(width, 1e-9)))
    if function == "LINEAR_EXACT":
        return np.clip((x - centre) / max(width, 1e-9) + 0.5, 0.0, 1.0)
    if width <= 1:
        return (x > centre - 0.5).astype(np.float64)
    return np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def gray_to_uint8(arr: np.ndarray, ds, frame: int = 0) -> tuple[np.ndarray, str]:
    """Stored grayscale values -> (uint8 HxW for display, how). MONOCHROME1 is inverted."""
    from pydicom.pixels import apply_voi

    values = _rescale(arr, ds, frame)
    own = "VOILUTSequence" in ds or "WindowCenter" in ds
    voi = ds if own else _functional_group(ds, frame, "FrameVOILUTSequence")
    how = "minmax"
    unit = None
    if voi is not None and voi.get("VOILUTSequence"):
        item = voi.VOILUTSequence[0]
        n, first, bits = (int(v) for v in item.LUTDescriptor)
        n = n or 65536  # 0 means 2**16 entries
        first = first - 65536 if first > 32767 and np.asarray(values).dtype.kind in "if" else first
        inputs = np.clip(np.rint(values), first, first + n - 1).astype(np.int64)  # beyond the LUT: its ends
        out = apply_voi(inputs, voi, index=0).astype(np.float64)
        top = max(float(2**bits - 1), float(out.max()) if out.size else 1.0)
        unit, how = out / top, "voi_lut"
    elif voi is not None and voi.get("WindowCenter") is not None and voi.get("WindowWidth") is not None:
        function = str(voi.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        unit, how = _window(values, _first(voi.WindowCenter), _first(voi.WindowWidth), function), "window"
    if unit is None:
        bits = int(ds.get("BitsStored", 8) or 8)
        if values.dtype.kind == "u" and bits <= 8 and values is arr:
            gray, how = arr.astype(np.uint8), "identity"
            if bits < 8:  # e.g. 1-bit masks: full range
                gray = np.clip(gray.astype(np.uint16) * 255 // (2**bits - 1), 0, 255).astype(np.uint8)
        else:
            lo, hi = float(values.min()), float(values.max())
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            gray = np.clip(np.rint((values.astype(np.float64) - lo) * scale), 0, 255).astype(np.uint8)
    else:
        gray = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        gray = 255 - gray
    return gray, how


def colour_to_uint8(arr: np.ndarray, ds) -> np.ndarray:
    """Decoded colour pixels (RGB after pydicom's YBR conversion, or palette indices) ->
    RGB (H, W, 3) uint8."""
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        if rgb.dtype != np.uint8:
            descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
            bits = int(descriptor[2]) if descriptor is not None else 16
            top = 2**bits - 1 if bits > 8 else 255
            if rgb.max(initial=0) <= 255 and bits > 8:  # 16-bit entries holding 8-bit values
                top = 255
            rgb = np.clip(np.rint(rgb.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
        return rgb
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DicomDecodeError(f"{pi} pixel data decoded to shape {arr.shape}, expected (rows, columns, 3)")
    if arr.dtype == np.uint8:
        return arr
    bits = int(ds.get("BitsStored", 16) or 16)
    return np.clip(arr.astype(np.float64) * (255.0 / (2**bits - 1)), 0, 255).round().astype(np.uint8)


def _expected_pixel_bytes(ds) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:
        return None
    if bits == 1:
        return (rows * cols * frames * spp + 7) // 8
    return rows * cols * spp * frames * (bits // 8)


@dataclass(frozen=True)
class DicomItem(SourceItem):
    """One DICOM file. `source` and `key` are pseudonymised; `path` is where the file is
    (in memory only: never written to a shard); `facts` are the non-identifying acquisition
    facts that go into `Loaded.info`; `error`: why the header could not be read."""

    path: Path = field(default=Path(), compare=False)
    frame_count: int = 1
    frame_stride: int = 1
    max_frames: int = 0
    facts: dict = field(default_factory=dict, compare=False, hash=False)
    error: str | None = None

    # -- the frames this item yields
    def frame_indices(self) -> list[int]:
        indices = list(range(0, max(self.frame_count, 1), self.frame_stride))
        return indices[: self.max_frames] if self.max_frames else indices

    @property
    def multi_frame(self) -> bool:
        return self.frame_count > 1

    def load(self) -> Loaded:
        """The first frame (of a multi-frame file: frame 0, with info["frame"] = 0)."""
        return next(self._decode([0]))

    def frames(self) -> Iterator[Loaded]:
        """Every `frame_stride`-th frame, at most `max_frames` (0: all); a single-frame file's one."""
        yield from self._decode(self.frame_indices())

    # -- decoding
    def _decode(self, indices: list[int]) -> Iterator[Loaded]:
        if self.error:
            raise DicomDecodeError(self.error)
        try:
            ds = read_header(self.path)
        except Exception as exc:
            raise DicomDecodeError(self._reason("DICOM header unreadable", exc)) from None
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is None:
            raise DicomDecodeError("DICOM header has no transfer syntax (truncated or damaged file meta)")
        problem = _decoder_problem(ts) if ts.is_compressed else None
        if problem:
            raise DicomDecodeError(problem)
        pi = str(ds.get("PhotometricInterpretation", "")).strip()
        if not pi and "Rows" not in ds:
            raise DicomDecodeError(self._why(ds, ValueError("no pixel data")))
        colour = pi in COLOUR_INTERPRETATIONS or pi == "PALETTE COLOR"
        if not (pi.startswith("MONOCHROME") or colour):
            raise DicomDecodeError(f"photometric interpretation {pi or '(none)'} is not supported")
        frames = self._pixels(ts, indices)
        for index in indices:
            info = dict(self.facts)
            with warnings.catch_warnings():  # around each step only: filters are global
                warnings.simplefilter("ignore")
                try:
                    arr = next(frames)
                except StopIteration:
                    raise DicomDecodeError(f"frame {index} is missing (file truncated?)") from None
                except Exception as exc:
                    raise DicomDecodeError(self._reason(self._why(ds, exc), exc)) from None
                try:
                    if colour:
                        image = colour_to_uint8(arr, ds)
                    elif arr.ndim != 2:
                        raise DicomDecodeError(
                            f"{pi} pixel data decoded to shape {arr.shape}, expected (rows, columns)"
                        )
                    else:
                        image, info["gray_mapping"] = gray_to_uint8(arr, ds, index)
                except DicomDecodeError:
                    raise
                except Exception as exc:
                    raise DicomDecodeError(self._reason(f"cannot map the {pi} pixel values to 8 bits", exc)) from None
            if image.ndim == 3:
                image = gray_if_uncoloured(image)  # grey stored as colour: (H, W), losslessly
            if self.multi_frame:
                info["frame"] = index
            yield Loaded(np.ascontiguousarray(image), None, info)

    def _pixels(self, ts, indices: list[int]) -> Iterator[np.ndarray]:
        """The stored pixels of `indices`, one frame at a time (RGB for YBR colour data)."""
        from pydicom import dcmread, uid
        from pydicom.pixels import iter_pixels, pixel_array

        if ts == uid.DeflatedExplicitVRLittleEndian:  # path-based decoding needs it inflated first
            full = dcmread(self.path)
            for i in indices:
                yield pixel_array(full, index=i if self.multi_frame else None)
        elif self.multi_frame:
            yield from iter_pixels(self.path, indices=indices)
        else:
            yield pixel_array(self.path)

    def _why(self, ds, exc: Exception) -> str:
        text = str(exc)
        if "no 'Pixel Data'" in text or "no pixel data" in text.lower():
            sop = getattr(ds.get("SOPClassUID"), "name", "") or "unknown SOP class"
            return f"no pixel data in this DICOM file ({sop}): not an image"
        expected = _expected_pixel_bytes(ds)
        ts = ds.file_meta.TransferSyntaxUID
        if expected and not ts.is_compressed:
            try:
                size = self.path.stat().st_size
            except OSError:
                size = None
            if size is not None and size < expected:
                return f"file truncated: {size} bytes, but its pixel data alone needs {expected}"
        if ts.is_compressed:
            return f"cannot decode the {ts.name} pixel data (damaged or truncated)"
        return "cannot read the pixel data (damaged or truncated file)"

    def _reason(self, what: str, exc: Exception) -> str:
        """`what` plus the exception text with file paths replaced by the pseudonymised source."""
        detail = f"{type(exc).__name__}: {exc}"
        for raw in sorted({str(self.path), self.path.name}, key=len, reverse=True):
            detail = detail.replace(raw, self.source)
        detail = _scrub_text(detail, self.path)
        return f"{what} ({detail})"


def _scrub_text(text: str, path: Path) -> str:
    """Remove identifying values of the file at `path` from an error message."""
    try:
        values = deid.identifying_values(read_header(path))
    except Exception:
        return text
    for texts in values.values():
        for value in sorted(texts, key=len, reverse=True):
            if len(value) >= 3:
                text = text.replace(value, "<removed>")
    return text
