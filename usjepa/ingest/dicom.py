"""DICOM source: a folder tree of DICOM files (any extension or none), single and multi-frame.

Listing reads only headers (`stop_before_pixels`); pixels are decoded on `load()` /
`frames()`, one frame at a time. Per photometric interpretation:

* MONOCHROME2: modality LUT (rescale), then the VOI LUT or the first window centre/width
  (LINEAR, LINEAR_EXACT, SIGMOID) mapped to 0-255; without either, 8-bit data is kept as
  is and deeper data is min-max scaled. MONOCHROME1 is the same, inverted (air dark).
* RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT: RGB (H, W, 3) uint8 (pydicom converts YBR).
* PALETTE COLOR: the palette applied, RGB (H, W, 3) uint8.
Colour whose three channels are equal everywhere (grey stored as RGB) comes back (H, W),
losslessly, as `sources.pil_to_array` does for image files.

Compressed transfer syntaxes decode when pydicom has a decoder for them (JPEG baseline and,
with an openjpeg-enabled Pillow, JPEG 2000); otherwise that item fails with the package to
install. Unreadable files never stop the listing: their items fail on `load()`.

De-identification (see `deid`): groups are salted pseudonyms of PatientID / StudyInstanceUID
/ SeriesInstanceUID, the item's `source` (and so its key) is its relative path with every
component that holds an identifier replaced by a pseudonym, and `Loaded.info` carries only
acquisition facts (modality, photometric interpretation, size, frames, transfer syntax,
pixel spacing) plus the pseudonymous patient and study. `stats()` says which identifying
attributes the files carried (names and counts only).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from usjepa.errors import UserError
from usjepa.ingest import deid
from usjepa.shardset.sample import make_key
from usjepa.ingest.sources import (
    DEFAULT_EXCLUDE,
    IMAGE_SUFFIXES,
    Loaded,
    Source,
    SourceItem,
    compile_pattern,
    register_source,
)

PREAMBLE = 128
MAGIC = b"DICM"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index, not an image
LABEL_MODES = ("auto", "folders", "none")
GROUP_BY = {"patient": "PatientID", "study": "StudyInstanceUID", "series": "SeriesInstanceUID", "file": None}
COLOUR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")
LOOKS_LIKE_SAMPLE = 200  # files looked at by `looks_like`


# ---------------------------------------------------------------------------- detection
def is_dicom_file(path) -> bool:
    """Whether `path` starts with the DICOM File Format's 128-byte preamble + 'DICM'."""
    try:
        with open(path, "rb") as f:
            head = f.read(PREAMBLE + len(MAGIC))
    except OSError:
        return False
    return head[PREAMBLE:] == MAGIC


def _walk(root: Path) -> Iterator[Path]:
    """Every non-hidden file under root, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():  # regular files only (never open a FIFO)
                yield path


def _read_header(path: Path):
    import pydicom

    with warnings.catch_warnings():  # pydicom's value warnings may quote identifying values
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


# ---------------------------------------------------------------------------- decoding
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
        return f"no pixel data decoder exists for transfer syntax {ts.name} ({ts}); convert the file (e.g. dcmdjpeg/gdcmconv)"
    if decoder.is_available:
        return None
    if ts in ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"):
        how = "High-Throughput JPEG 2000 pixel data needs pylibjpeg-openjpeg >= 2: pip install pylibjpeg pylibjpeg-openjpeg"
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
    src = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else _functional_group(
        ds, frame, "PixelValueTransformationSequence"
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
    voi = ds if ("VOILUTSequence" in ds or "WindowCenter" in ds) else _functional_group(ds, frame, "FrameVOILUTSequence")
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
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2]) if "RedPaletteColorLookupTableDescriptor" in ds else 16
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


def _collapse_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W) when the three channels are identical (like `sources.pil_to_array`), else `rgb`."""
    red = rgb[..., 0]
    if np.array_equal(red, rgb[..., 1]) and np.array_equal(red, rgb[..., 2]):
        return np.ascontiguousarray(red)
    return rgb


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


# ---------------------------------------------------------------------------- items
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
        """Every `frame_stride`-th frame, at most `max_frames` (0: all)."""
        if not self.multi_frame:
            yield self.load()
            return
        yield from self._decode(self.frame_indices())

    # -- decoding
    def _decode(self, indices: list[int]) -> Iterator[Loaded]:
        if self.error:
            raise DicomDecodeError(self.error)
        try:
            ds = _read_header(self.path)
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
                        raise DicomDecodeError(f"{pi} pixel data decoded to shape {arr.shape}, expected (rows, columns)")
                    else:
                        image, info["gray_mapping"] = gray_to_uint8(arr, ds, index)
                except DicomDecodeError:
                    raise
                except Exception as exc:
                    raise DicomDecodeError(self._reason(f"cannot map the {pi} pixel values to 8 bits", exc)) from None
            if image.ndim == 3:
                image = _collapse_gray(image)  # grey stored as colour: (H, W), losslessly
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
        values = deid.identifying_values(_read_header(path))
    except Exception:
        return text
    for texts in values.values():
        for value in sorted(texts, key=len, reverse=True):
            if len(value) >= 3:
                text = text.replace(value, "<removed>")
    return text


# ---------------------------------------------------------------------------- source
@dataclass
class _Entry:
    rel: str
    path: Path
    cls: str
    header: object = None
    error: str | None = None


@register_source("dicom")
class DicomSource(Source):
    """A folder tree of DICOM files, detected by content (preamble + 'DICM'), not extension.

    labels: 'folders' (root/<class>/..., sorted names give labels 0..n-1), 'none' (label -1,
    class_name ''), or 'auto' (folders when the root holds only folders, at least two, and
    none of them is named after a patient or other identifier of its files).
    group_by: 'patient' (PatientID), 'study' (StudyInstanceUID), 'series' (SeriesInstanceUID)
    or 'file'; files without the tag fall back to their own group. Groups are salted
    pseudonyms, never the raw ids.
    frame_stride / max_frames: which frames of a multi-frame file `frames()` yields.
    salt / salt_path / output_dir: the de-identification salt (bytes), or the file holding
    it (default `deid.default_salt_path()`, created on first use); a salt file inside
    `output_dir` is refused.
    exclude_pattern: regex; files whose stem matches are skipped. group_pattern is not
    supported (grouping comes from the DICOM tags).
    pseudonymised_root: the root's folder name, identifiers replaced (what a build records).
    """

    looks_for = "DICOM files (128-byte preamble + 'DICM', any extension) below the root, not outnumbered by images"

    def __init__(
        self,
        root,
        labels: str = "auto",
        group_by: str = "patient",
        frame_stride: int = 1,
        max_frames: int = 0,
        salt: bytes | None = None,
        salt_path=None,
        output_dir=None,
        group_pattern: str | None = None,
        exclude_pattern: str | None = DEFAULT_EXCLUDE,
    ):
        self.root = Path(root).expanduser().absolute()
        problems = []
        if labels not in LABEL_MODES:
            problems.append(f"labels {labels!r} is not one of {', '.join(LABEL_MODES)}")
        if group_by not in GROUP_BY:
            problems.append(f"group_by {group_by!r} is not one of {', '.join(GROUP_BY)}")
        if not isinstance(frame_stride, int) or isinstance(frame_stride, bool) or frame_stride < 1:
            problems.append(f"frame stride {frame_stride!r} must be an integer >= 1")
        if not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 0:
            problems.append(f"max frames {max_frames!r} must be an integer >= 0 (0: all)")
        if group_pattern:
            problems.append(
                "a group pattern does not apply to DICOM sources (groups come from the PatientID/StudyInstanceUID "
                "tags); drop --group-pattern and choose group_by patient|study|series|file"
            )
        if problems:
            raise UserError(f"invalid DICOM source options for {self.root}: " + "; ".join(problems))
        self.labels, self.group_by = labels, group_by
        self.frame_stride, self.max_frames = frame_stride, max_frames
        self.exclude_pattern = exclude_pattern
        self._exclude_rx = compile_pattern(exclude_pattern, "exclude pattern", need_group=False)
        if salt is not None:
            if not isinstance(salt, (bytes, bytearray)) or len(salt) < 16:
                raise UserError("the de-identification salt must be at least 16 bytes; use deid.load_or_create_salt")
            if output_dir is not None and salt_path is not None:
                deid.check_salt_location(salt_path, output_dir)
            self._salt = bytes(salt)
        else:
            self._salt = deid.load_or_create_salt(salt_path, output_dir)
        self._items, self._stats, self.classes, self.label_mode, self.pseudonymised_root = self._scan()

    # -- listing
    def _scan(self):
        root = self.root
        if not root.exists():
            raise UserError(f"DICOM source folder {root} does not exist; check the path")
        if not root.is_dir():
            raise UserError(f"DICOM source {root} is not a folder; give the folder that holds the DICOM files")
        counts = Counter()
        entries: list[_Entry] = []
        for path in _walk(root):
            counts["files_found"] += 1
            rel = path.relative_to(root).as_posix()
            if not is_dicom_file(path):
                counts["non_dicom_skipped"] += 1
                if path.name.lower().endswith(IMAGE_SUFFIXES):
                    counts["regular_images_skipped"] += 1
                continue
            if self._exclude_rx is not None and self._exclude_rx.search(path.stem):
                counts["excluded"] += 1
                continue
            parts = rel.split("/")
            entry = _Entry(rel, path, parts[0] if len(parts) > 1 else "")
            try:
                entry.header = _read_header(path)
            except Exception as exc:
                entry.error = f"DICOM header unreadable ({type(exc).__name__}; damaged or truncated file)"
            else:
                meta = getattr(entry.header, "file_meta", None)
                sop = str(entry.header.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
                if sop == DICOMDIR_SOP_CLASS:
                    counts["dicomdir_skipped"] += 1
                    continue
                if meta is None or "TransferSyntaxUID" not in meta:
                    entry.error = "DICOM header has no transfer syntax (truncated or damaged file meta)"
            entries.append(entry)
        if not entries:
            raise UserError(
                f"no DICOM files found under {root} ({counts['files_found']} file(s), {counts['non_dicom_skipped']} "
                f"not DICOM, {counts['excluded']} excluded by {self.exclude_pattern!r}); DICOM files are recognised "
                "by content (128-byte preamble + 'DICM'): point to the folder holding them"
            )

        scrubber = deid.PathScrubber(self._salt)
        values = [deid.identifying_values(e.header) if e.header is not None else {} for e in entries]
        patient_ids = {self._tag(e, "PatientID") for e in entries} - {""}
        label_mode, label_note = self._label_mode(root, entries, values, scrubber)
        pseudonymised_root = self._pseudonymise_root(values, patient_ids, scrubber)

        items: list[DicomItem] = []
        modality, photometric, syntaxes, burned = Counter(), Counter(), Counter(), Counter()
        identifying, fallback = Counter(), 0
        multi = frames_total = frames_selected = private_files = 0
        for entry, vals in zip(entries, values):
            pid = self._tag(entry, "PatientID")
            if entry.header is not None:
                source = scrubber.scrub(entry.rel, pid, vals)
            else:  # header unknown: scrub against every patient id of the tree
                source = scrubber.scrub(entry.rel, "", {"PatientID": sorted(patient_ids)})
            source = self._scrub_known(source, patient_ids, scrubber)
            cls = entry.cls if label_mode == "folders" else ""
            group = self._group(entry, source)
            if group.startswith("file-") and self.group_by != "file":
                fallback += 1
            facts, frame_count = {}, 1
            if entry.header is not None and entry.error is None:
                ds = entry.header
                report = deid.removed_report(ds)
                identifying.update(report["identifying_tags"])
                private_files += bool(report["private_tags"])
                facts, frame_count = self._facts(ds, pid)
                modality[facts.get("modality") or "(none)"] += 1
                photometric[facts.get("photometric_interpretation") or "(none)"] += 1
                syntaxes[facts.get("transfer_syntax") or "(none)"] += 1
                burned[str(ds.get("BurnedInAnnotation", "") or "").strip().upper() or "(absent)"] += 1
            item = DicomItem(
                key=make_key(source),
                source=source,
                label=-1,
                class_name=cls,
                group=group,
                path=entry.path,
                frame_count=frame_count,
                frame_stride=self.frame_stride,
                max_frames=self.max_frames,
                facts=facts,
                error=entry.error,
            )
            if frame_count > 1:
                multi += 1
                frames_total += frame_count
                frames_selected += len(item.frame_indices())
            items.append(item)

        classes = sorted({it.class_name for it in items}) if label_mode == "folders" else []
        labels = {c: i for i, c in enumerate(classes)}
        if label_mode == "folders":
            items = [_with_label(it, labels[it.class_name]) for it in items]
        items.sort(key=lambda it: it.source)

        warnings_ = []
        other = {m: n for m, n in modality.items() if m != "US"}
        if other:
            warnings_.append(
                "files with a modality other than US (ultrasound): "
                + ", ".join(f"{m} {n}" for m, n in sorted(other.items()))
            )
        if burned.get("YES"):
            warnings_.append(
                f"{burned['YES']} file(s) declare burned-in annotation (BurnedInAnnotation YES): text inside the "
                "scan region is not removed by preprocessing"
            )
        unreadable = sum(1 for it in items if it.error)
        stats = {
            "files_found": counts["files_found"],
            "dicom_files": len(items),
            "non_dicom_skipped": counts["non_dicom_skipped"],
            "regular_images_skipped": counts["regular_images_skipped"],
            "excluded": counts["excluded"],
            "exclude_pattern": self.exclude_pattern,
            "dicomdir_skipped": counts["dicomdir_skipped"],
            "unreadable_headers": unreadable,
            "modalities": dict(sorted(modality.items())),
            "photometric_interpretations": dict(sorted(photometric.items())),
            "transfer_syntaxes": dict(sorted(syntaxes.items())),
            "multi_frame_files": multi,
            "frames_in_multi_frame_files": frames_total,
            "frames_selected": frames_selected + (len(items) - multi),
            "frame_stride": self.frame_stride,
            "max_frames": self.max_frames,
            "labels": label_mode,
            "label_note": label_note,
            "burned_in_annotation": dict(sorted(burned.items())),
            "deidentification": {
                "identifying_tags_present": dict(sorted(identifying.items())),
                "files_with_private_tags": private_files,
                "kept": "modality, photometric interpretation, rows, columns, number of frames, frame index, "
                "transfer syntax, pixel spacing, pseudonymous patient and study",
                "removed": "every other attribute (none is copied); identifying path components pseudonymised",
            },
            "warnings": warnings_,
        }
        return items, stats, classes, label_mode, pseudonymised_root

    @staticmethod
    def _tag(entry: _Entry, keyword: str) -> str:
        if entry.header is None:
            return ""
        try:
            return str(entry.header.get(keyword, "") or "").strip()
        except Exception:
            return ""

    def _scrub_known(self, source: str, patient_ids: set[str], scrubber: deid.PathScrubber) -> str:
        """Components exactly equal to any patient id of the tree (a patient folder holding
        another patient's file, an unreadable file) become that patient's pseudonym."""
        parts = source.split("/")
        return "/".join(deid.pseudonym(self._salt, "patient", p) if p.strip() in patient_ids else p for p in parts)

    def _pseudonymise_root(self, values, patient_ids: set[str], scrubber: deid.PathScrubber) -> str:
        """The root's own folder name with every part that names an identifier of any file of
        the tree replaced: what a manifest records instead of the root path (the export folder
        may be named after a patient; folders above it are not recorded at all)."""
        tree_values: dict[str, set[str]] = {}
        for vals in values:
            for keyword, texts in vals.items():
                tree_values.setdefault(keyword, set()).update(texts)
        name = self._scrub_known(self.root.name, patient_ids, scrubber)
        return scrubber.scrub(name, "", {k: sorted(v) for k, v in tree_values.items()})

    def _label_mode(self, root: Path, entries, values, scrubber) -> tuple[str, str]:
        first = [p for p in root.iterdir() if not p.name.startswith(".")]
        all_folders = bool(first) and all(p.is_dir() for p in first)
        if self.labels == "none":
            return "none", "unlabelled (labels='none')"
        if self.labels == "folders" and not all_folders:
            loose = sorted(p.name for p in first if not p.is_dir())
            raise UserError(
                f"labels='folders' needs one subfolder per class in {root}, but {len(loose)} file(s) sit directly in "
                f"it; move them into class folders ({root}/<class>/...) or use labels='none'"
            )
        # a class folder named after an identifier of its files is a patient/study folder, not a class
        suspect = sorted(
            {
                e.cls
                for e, v in zip(entries, values)
                if e.cls and scrubber.names_identifier(e.cls, self._tag(e, "PatientID"), v)
            }
        )
        if self.labels == "folders":
            if suspect:
                raise UserError(
                    f"labels='folders' but {len(suspect)} first-level folder(s) of {root} are named after an identifier "
                    "of their files (patient id or name, accession number, UID, date, institution); class folders must "
                    "be class names (e.g. benign/, malignant/): "
                    "rearrange the tree or use labels='none'"
                )
            return "folders", "first-level folder names (labels='folders')"
        if not all_folders:
            return "none", "unlabelled: the root holds files, not only class folders"
        if len(first) < 2:
            return "none", "unlabelled: the root holds a single folder (an export folder, not classes)"
        if suspect:
            return "none", "unlabelled: first-level folders are named after patient/study identifiers, not classes"
        return "folders", "first-level folder names (auto: the root holds only folders)"

    def _group(self, entry: _Entry, source: str) -> str:
        keyword = GROUP_BY[self.group_by]
        value = self._tag(entry, keyword) if keyword else ""
        if value:
            return deid.pseudonym(self._salt, self.group_by, value)
        return deid.pseudonym(self._salt, "file", entry.rel)

    def _facts(self, ds, pid: str) -> tuple[dict, int]:
        """Non-identifying acquisition facts for `Loaded.info` and the frame count."""
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        ts = ds.file_meta.TransferSyntaxUID
        facts = {
            "modality": str(ds.get("Modality", "") or "").strip(),
            "photometric_interpretation": str(ds.get("PhotometricInterpretation", "") or "").strip(),
            "rows": _int_or_none(ds.get("Rows")),
            "columns": _int_or_none(ds.get("Columns")),
            "number_of_frames": frames,
            "transfer_syntax": ts.name if ts.is_transfer_syntax else "private transfer syntax",
        }
        spacing = _pixel_spacing(ds)
        if spacing is not None:
            facts["pixel_spacing_mm"], facts["pixel_spacing_from"] = spacing
        facts["patient"] = deid.pseudonym(self._salt, "patient", pid) if pid else None
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
        facts["study"] = deid.pseudonym(self._salt, "study", study) if study else None
        return facts, max(frames, 1)

    # -- Source API
    @classmethod
    def looks_like(cls, root) -> bool:
        """True when the tree holds DICOM files (looking at up to 200 files) and ordinary
        image files do not outnumber them."""
        root = Path(root)
        if not root.is_dir():
            return False
        dicom = images = 0
        for n, path in enumerate(_walk(root)):
            if n >= LOOKS_LIKE_SAMPLE:
                break
            if path.name.lower().endswith(IMAGE_SUFFIXES):
                images += 1
            elif is_dicom_file(path):
                dicom += 1
        return dicom > 0 and dicom >= images

    def grouping(self) -> dict:
        return {
            "mode": "dicom_tag",
            "group_by": self.group_by,
            "tag": GROUP_BY[self.group_by],
            "pseudonym": "HMAC-SHA256 of the tag value with a secret salt, first 16 hex digits "
            "(same salt: same pseudonym across builds)",
            "salt_id": deid.salt_id(self._salt),
            "fallback": "files without the tag are their own group",
        }


def _with_label(item: DicomItem, label: int) -> DicomItem:
    from dataclasses import replace

    return replace(item, label=label)


def _int_or_none(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _pixel_spacing(ds) -> tuple[list[float], str] | None:
    """[row, column] spacing in mm: PixelSpacing, else the first 2-D ultrasound region whose
    physical units are cm (PhysicalDeltaY/X)."""
    try:
        if ds.get("PixelSpacing"):
            return [round(float(v), 6) for v in ds.PixelSpacing][:2], "PixelSpacing"
        for region in ds.get("SequenceOfUltrasoundRegions") or []:
            if (
                int(region.get("RegionSpatialFormat", 0) or 0) == 1
                and int(region.get("PhysicalUnitsXDirection", 0) or 0) == 3
                and int(region.get("PhysicalUnitsYDirection", 0) or 0) == 3
            ):
                dy, dx = float(region.PhysicalDeltaY) * 10, float(region.PhysicalDeltaX) * 10
                if dx > 0 and dy > 0:
                    return [round(dy, 6), round(dx, 6)], "SequenceOfUltrasoundRegions"
    except Exception:
        return None
    return None

