"""DICOM source: a folder tree of DICOM files (found by content, any extension), single and
multi-frame, de-identified on the way in (docs/data.md#sources, "dicom", and
docs/data.md#de-identification)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from usjepa.errors import UserError
from usjepa.ingest.ranges import range_problems
from usjepa.ingest.sources import deid
from usjepa.ingest.sources.base import (
    DEFAULT_EXCLUDE,
    Patterns,
    Source,
    check_folder,
    folder_label_mode,
    label_indices,
    register_source,
)
from usjepa.ingest.sources.dicom_pixels import (  # noqa: F401  (DicomDecodeError: what a failed item raises)
    DICOMDIR_SOP_CLASS,
    DicomDecodeError,
    DicomItem,
    is_dicom_file,
    read_header,
)
from usjepa.ingest.sources.walk import first_files, is_image, walk
from usjepa.shardset.sample import make_key

GROUP_BY = {"patient": "PatientID", "study": "StudyInstanceUID", "series": "SeriesInstanceUID", "file": None}
KEPT_FACTS = (
    "modality, photometric interpretation, rows, columns, number of frames, frame index, transfer syntax, "
    "pixel spacing, pseudonymous patient and study"
)


@dataclass
class _Entry:
    rel: str
    path: Path
    cls: str
    header: object = None
    error: str | None = None


@register_source("dicom")
class DicomSource(Source):
    """A folder tree of DICOM files; groups are salted pseudonyms of a DICOM tag, never raw ids."""

    # what each option means: docs/data.md#dicom
    @dataclass(frozen=True)
    class Options:
        labels: Literal["auto", "folders", "none"] = "auto"
        group_by: Literal["patient", "study", "series", "file"] = "patient"
        frame_stride: int = 1
        max_frames: int = 0
        salt: bytes | None = None
        """The de-identification salt itself (Python callers); else the file `salt_path`."""
        salt_path: str | None = None
        """File holding the salt (default `deid.default_salt_path()`, created on first use)."""
        output_dir: str | None = None
        """Set by the build to OUT: a salt file inside it is refused."""
        group_pattern: str | None = None
        """Not supported: groups come from the DICOM tags (group_by)."""
        exclude_pattern: str | None = DEFAULT_EXCLUDE

    looks_for = "DICOM files (128-byte preamble + 'DICM', any extension) below the root, not outnumbered by images"

    def scan(self):
        self._check_options()
        self._salt = self._load_salt()
        check_folder(self.root, "give the folder that holds the DICOM files", what="DICOM source")
        entries, counts = self._entries()
        scrubber = deid.PathScrubber(self._salt)
        values = [deid.identifying_values(e.header) if e.header is not None else {} for e in entries]
        patient_ids = {_tag(e, "PatientID") for e in entries} - {""}
        self.label_mode, label_note = self._label_mode(entries, values, scrubber)
        self.pseudonymised_root = self._pseudonymise_root(values, patient_ids, scrubber)
        tally = Counter()
        items = [self._item(e, v, patient_ids, scrubber, tally) for e, v in zip(entries, values)]
        classes = sorted({it.class_name for it in items}) if self.label_mode == "folders" else []
        labels = label_indices(classes)
        if self.label_mode == "folders":
            items = [replace(it, label=labels[it.class_name]) for it in items]
        items.sort(key=lambda it: it.source)
        return items, self._summary(items, counts, tally, label_note), classes

    def _check_options(self) -> None:
        o = self.options
        problems = range_problems(o, {"frame_stride": "integer >= 1", "max_frames": "integer >= 0 (0: all)"})
        if o.group_pattern:
            problems.append(
                "a group pattern does not apply to DICOM sources (groups come from the PatientID/"
                "StudyInstanceUID tags); drop --group-pattern and choose group_by "
                "patient|study|series|file"
            )
        if problems:
            raise UserError(f"invalid DICOM source options for {self.root}: " + "; ".join(problems))
        self.patterns = Patterns(None, o.exclude_pattern)

    def _load_salt(self) -> bytes:
        o = self.options
        if o.salt is None:
            return deid.load_or_create_salt(o.salt_path, o.output_dir)
        if len(o.salt) < 16:
            raise UserError("the de-identification salt must be at least 16 bytes; use deid.load_or_create_salt")
        if o.output_dir is not None and o.salt_path is not None:
            deid.check_salt_location(o.salt_path, o.output_dir)
        return bytes(o.salt)

    def _entries(self) -> tuple[list[_Entry], Counter]:
        """The DICOM files of the tree with their headers (read without pixels)."""
        listing = walk(self.root, is_dicom_file, self.patterns)
        counts = Counter(
            files_found=len(listing.files) + len(listing.other) + listing.excluded,
            non_dicom_skipped=len(listing.other),
            excluded=listing.excluded,
            regular_images_skipped=sum(is_image(p.name) for p in listing.other),
        )
        entries = []
        for path in listing.files:
            rel = path.relative_to(self.root).as_posix()
            parts = rel.split("/")
            entry = _Entry(rel, path, parts[0] if len(parts) > 1 else "")
            try:
                entry.header = read_header(path)
            except Exception as exc:
                entry.error = f"DICOM header unreadable ({type(exc).__name__}; damaged or truncated file)"
            else:
                meta = getattr(entry.header, "file_meta", None)
                stored = meta.get("MediaStorageSOPClassUID", "") if meta else ""
                sop = str(entry.header.get("SOPClassUID", "") or stored)
                if sop == DICOMDIR_SOP_CLASS:
                    counts["dicomdir_skipped"] += 1
                    continue
                if meta is None or "TransferSyntaxUID" not in meta:
                    entry.error = "DICOM header has no transfer syntax (truncated or damaged file meta)"
            entries.append(entry)
        if not entries:
            raise UserError(
                f"no DICOM files found under {self.root} ({counts['files_found']} file(s), "
                f"{counts['non_dicom_skipped']} not DICOM, {counts['excluded']} excluded by "
                f"{self.options.exclude_pattern!r}); DICOM files are recognised by content (128-byte preamble + "
                "'DICM'): point to the folder holding them"
            )
        return entries, counts

    def _item(self, entry: _Entry, vals: dict, patient_ids: set[str], scrubber, tally: Counter) -> DicomItem:
        """The item of one file, its source path pseudonymised; `tally` counts what the headers say."""
        pid = _tag(entry, "PatientID")
        if entry.header is not None:
            source = scrubber.scrub(entry.rel, pid, vals)
        else:  # header unknown: scrub against every patient id of the tree
            source = scrubber.scrub(entry.rel, "", {"PatientID": sorted(patient_ids)})
        source = self._scrub_known(source, patient_ids)
        group = self._group(entry)
        facts, frame_count = {}, 1
        if entry.header is not None and entry.error is None:
            ds = entry.header
            report = deid.removed_report(ds)
            tally.update(f"tag:{t}" for t in report["identifying_tags"])
            tally["private_files"] += bool(report["private_tags"])
            facts, frame_count = self._facts(ds, pid)
            tally[f"modality:{facts.get('modality') or '(none)'}"] += 1
            tally[f"photometric:{facts.get('photometric_interpretation') or '(none)'}"] += 1
            tally[f"syntax:{facts.get('transfer_syntax') or '(none)'}"] += 1
            tally[f"burned:{str(ds.get('BurnedInAnnotation', '') or '').strip().upper() or '(absent)'}"] += 1
        o = self.options
        return DicomItem(
            key=make_key(source),
            source=source,
            label=-1,
            class_name=entry.cls if self.label_mode == "folders" else "",
            group=group,
            path=entry.path,
            frame_count=frame_count,
            frame_stride=o.frame_stride,
            max_frames=o.max_frames,
            facts=facts,
            error=entry.error,
        )

    def _summary(self, items: list[DicomItem], counts: Counter, tally: Counter, label_note: str) -> dict:
        def part(prefix: str) -> dict:
            return dict(sorted((k[len(prefix) :], n) for k, n in tally.items() if k.startswith(prefix) and n))

        multi = [it for it in items if it.frame_count > 1]
        modality, burned = part("modality:"), part("burned:")
        warnings_ = []
        other = {m: n for m, n in modality.items() if m != "US"}
        if other:
            warnings_.append(
                "files with a modality other than US (ultrasound): "
                + ", ".join(f"{m} {n}" for m, n in sorted(other.items()))
            )
        if burned.get("YES"):
            warnings_.append(
                f"{burned['YES']} file(s) declare burned-in annotation (BurnedInAnnotation YES): text "
                "inside the scan region is not removed by preprocessing"
            )
        o = self.options
        return {
            "files_found": counts["files_found"],
            "dicom_files": len(items),
            "non_dicom_skipped": counts["non_dicom_skipped"],
            "regular_images_skipped": counts["regular_images_skipped"],
            "excluded": counts["excluded"],
            "exclude_pattern": o.exclude_pattern,
            "dicomdir_skipped": counts["dicomdir_skipped"],
            "unreadable_headers": sum(1 for it in items if it.error),
            "modalities": modality,
            "photometric_interpretations": part("photometric:"),
            "transfer_syntaxes": part("syntax:"),
            "multi_frame_files": len(multi),
            "frames_in_multi_frame_files": sum(it.frame_count for it in multi),
            "frames_selected": sum(len(it.frame_indices()) for it in multi) + (len(items) - len(multi)),
            "frame_stride": o.frame_stride,
            "max_frames": o.max_frames,
            "labels": self.label_mode,
            "label_note": label_note,
            "burned_in_annotation": burned,
            "deidentification": {
                "identifying_tags_present": part("tag:"),
                "files_with_private_tags": tally["private_files"],
                "kept": KEPT_FACTS,
                "removed": "every other attribute (none is copied); identifying path components pseudonymised",
            },
            "warnings": warnings_,
        }

    def _scrub_known(self, source: str, patient_ids: set[str]) -> str:
        """Components exactly equal to any patient id of the tree (a patient folder holding
        another patient's file, an unreadable file) become that patient's pseudonym."""
        parts = source.split("/")
        return "/".join(deid.pseudonym(self._salt, "patient", p) if p.strip() in patient_ids else p for p in parts)

    def _pseudonymise_root(self, values, patient_ids: set[str], scrubber: deid.PathScrubber) -> str:
        """The root's folder name with every part that names an identifier of any file replaced:
        what a manifest records instead of the root path (folders above it are not recorded)."""
        tree_values: dict[str, set[str]] = {}
        for vals in values:
            for keyword, texts in vals.items():
                tree_values.setdefault(keyword, set()).update(texts)
        name = self._scrub_known(self.root.name, patient_ids)
        return scrubber.scrub(name, "", {k: sorted(v) for k, v in tree_values.items()})

    def _label_mode(self, entries, values, scrubber) -> tuple[str, str]:
        root, labels = self.root, self.options.labels
        first = [p for p in root.iterdir() if not p.name.startswith(".")]
        loose = sum(not p.is_dir() for p in first)  # not named: a file name may be an identifier
        # a class folder named after an identifier of its files is a patient/study folder, not a class
        suspect = {
            e.cls
            for e, v in zip(entries, values)
            if labels != "none" and e.cls and scrubber.names_identifier(e.cls, _tag(e, "PatientID"), v)
        }
        if labels == "folders" and suspect and not loose:
            raise UserError(
                f"labels='folders' but {len(suspect)} first-level folder(s) of {root} are named after an "
                "identifier of their files (patient id or name, accession number, UID, date, institution); "
                "class folders must be class names (e.g. benign/, malignant/): rearrange the tree or use "
                "labels='none'"
            )
        auto = [
            (loose, "the root holds files, not only class folders"),
            (len(first) < 2, "the root holds a single folder (an export folder, not classes)"),
            (suspect, "first-level folders are named after patient/study identifiers, not classes"),
        ]
        return folder_label_mode(labels, root, f"{loose} file(s)" if loose else "", auto, "the root holds only folders")

    def _group(self, entry: _Entry) -> str:
        group_by = self.options.group_by
        keyword = GROUP_BY[group_by]
        value = _tag(entry, keyword) if keyword else ""
        if value:
            return deid.pseudonym(self._salt, group_by, value)
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

    @classmethod
    def looks_like(cls, root) -> bool:
        """The tree holds DICOM files (of the first 200) and ordinary images do not outnumber them."""
        dicom = images = 0
        for path in first_files(root):
            if is_image(path.name):
                images += 1
            elif is_dicom_file(path):
                dicom += 1
        return dicom > 0 and dicom >= images

    def grouping(self) -> dict:
        return {
            "mode": "dicom_tag",
            "group_by": self.options.group_by,
            "tag": GROUP_BY[self.options.group_by],
            "pseudonym": "HMAC-SHA256 of the tag value with a secret salt, first 16 hex digits "
            "(same salt: same pseudonym across builds)",
            "salt_id": deid.salt_id(self._salt),
            "fallback": "files without the tag are their own group",
        }


def _tag(entry: _Entry, keyword: str) -> str:
    if entry.header is None:
        return ""
    try:
        return str(entry.header.get(keyword, "") or "").strip()
    except Exception:
        return ""


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
