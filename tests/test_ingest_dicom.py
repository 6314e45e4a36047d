"""DICOM source and de-identification: pydicom's real ultrasound files plus synthetic files
written here (with identifying values that must never come out)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

from usjepa.errors import UserError
from usjepa.ingest.sources import SOURCES, deid, open_source
from usjepa.ingest.sources.dicom import DicomDecodeError, DicomSource, is_dicom_file

SALT = bytes(range(32))
OTHER_SALT = bytes(range(1, 33))
PID = "PID-123456"
IDENTIFYING = {
    "PatientName": "Doe^Jane",
    "PatientID": PID,
    "PatientBirthDate": "19700101",
    "InstitutionName": "St Example Hospital",
    "ReferringPhysicianName": "Who^Doctor",
    "AccessionNumber": "ACC-778899",
    "StudyDate": "20240102",
    "StationName": "USROOM7",
    "DeviceSerialNumber": "SN-4455667",
}
# strings that must not appear anywhere in what the source hands out
SECRETS = [
    "Doe^Jane",
    "Doe",
    "Jane",
    PID,
    "123456",
    "19700101",
    "St Example Hospital",
    "Example Hospital",
    "Who^Doctor",
    "ACC-778899",
    "778899",
    "20240102",
    "USROOM7",
    "SN-4455667",
    "4455667",
]
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
EXAMPLES = ["examples_ybr_color.dcm", "examples_rgb_color.dcm", "examples_palette.dcm", "examples_jpeg2k.dcm"]


# ----------------------------------------------------------------------------- writing files
def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    *,
    bits_stored: int | None = None,
    frames: int = 0,
    modality: str = "US",
    transfer_syntax=ExplicitVRLittleEndian,
    study_uid: str | None = None,
    patient_id: str = PID,
    **tags,
) -> Path:
    """Write a DICOM file with the identifying values of IDENTIFYING (patient id overridable)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    sop_class = US_MULTIFRAME if frames else US_IMAGE
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for keyword, value in IDENTIFYING.items():
        setattr(ds, keyword, value)
    ds.PatientID = patient_id
    ds.PatientSex = "F"
    ds.Modality = modality
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    if pixels is not None:
        colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
        ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if frames:
            ds.NumberOfFrames = frames
        if transfer_syntax.is_compressed:
            ds.PixelData = encapsulate([b"\xff\xd8 not really compressed data \xff\xd9"])
        else:
            ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(h: int = 48, w: int = 64, top: int = 4000) -> np.ndarray:
    return np.tile(np.linspace(0, top, w), (h, 1)).astype(np.uint16)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/PID-123456/... (synthetic files of one patient, incl. broken ones), root/PID-654321/...,
    root/examples/ (pydicom's ultrasound files), and a non-DICOM file."""
    root = tmp_path_factory.mktemp("dicom") / "tree"
    pat = root / PID
    write_dicom(pat / "mono2_16bit.dcm", gradient(), bits_stored=12, WindowCenter=1000, WindowWidth=1000)
    mono1 = np.zeros((48, 64), np.uint16)
    mono1[:, 32:] = 4095  # right half: stored high = "bright" if read naively (air); must come out dark
    write_dicom(pat / f"{PID}_mono1.dcm", mono1, "MONOCHROME1", bits_stored=12)
    cine = np.stack([np.full((40, 56), 20 * k, np.uint8) for k in range(6)])
    cine[:, :5, :5] = 255  # a bright corner so min-max stays defined
    write_dicom(pat / "cine", cine, frames=6)  # no extension: found by content
    write_dicom(pat / "nopixels.dcm", None)
    full = write_dicom(pat / "whole.dcm", gradient(64, 64), bits_stored=12).read_bytes()
    (pat / "truncated.dcm").write_bytes(full[: len(full) - 3000])
    (pat / "header_cut.dcm").write_bytes(full[:200])
    (pat / f"notes_{PID}.txt").write_text(f"{PID} Doe^Jane")  # not DICOM
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 120, 40
    rgb[:, :8] = 90
    write_dicom(pat / "ybr_full.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL")
    write_dicom(
        root / "PID-654321" / "grey_rgb.dcm",
        np.repeat(gradient(16, 24, 255).astype(np.uint8)[..., None], 3, 2),
        "RGB",
        patient_id="PID-654321",
    )
    write_dicom(pat / "jpegls.dcm", gradient(16, 16), transfer_syntax=JPEGLSLossless)
    write_dicom(
        root / "PID-654321" / "ct.dcm", gradient(32, 32), bits_stored=12, patient_id="PID-654321", modality="CT"
    )
    for name in EXAMPLES:
        (root / "examples").mkdir(exist_ok=True)
        shutil.copy(get_testdata_file(name), root / "examples" / name)
    return root


@pytest.fixture(scope="module")
def source(tree) -> DicomSource:
    return DicomSource(tree, salt=SALT)


def by_name(source: DicomSource, name: str):
    """The item whose real file is named `name` (the item's `source` is pseudonymised)."""
    (item,) = [it for it in source if it.path.name == name]
    return item


# ----------------------------------------------------------------------------- listing
def test_listing_finds_dicom_by_content_and_counts(tree, source):
    assert "dicom" in SOURCES and DicomSource.looks_like(tree)
    assert is_dicom_file(tree / PID / "cine") and not is_dicom_file(tree / PID / f"notes_{PID}.txt")
    stats = source.stats()
    assert stats["files_found"] == 16 and stats["dicom_files"] == 15 and stats["non_dicom_skipped"] == 1
    assert stats["modalities"]["US"] == 13 and stats["modalities"]["CT"] == 1  # header_cut.dcm has none
    assert any("CT 1" in w for w in stats["warnings"])
    assert stats["unreadable_headers"] == 1  # header_cut.dcm
    assert stats["multi_frame_files"] == 2 and stats["frames_in_multi_frame_files"] == 36
    assert "PatientName" in stats["deidentification"]["identifying_tags_present"]
    # patient folders are not classes: auto labelling falls back to unlabelled
    assert source.label_mode == "none" and source.classes == []
    assert all(it.label == -1 and it.class_name == "" for it in source)
    assert len({it.key for it in source}) == len(source)


def test_looks_like(tmp_path, tree):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "imgs" / "a" / f"{i}.png").write_bytes(b"\x89PNG")
    assert not DicomSource.looks_like(tmp_path / "imgs")
    assert not DicomSource.looks_like(tmp_path / "missing")
    shutil.copy(tree / PID / "cine", tmp_path / "imgs" / "a" / "x")
    assert not DicomSource.looks_like(tmp_path / "imgs")  # 3 images outnumber 1 DICOM
    assert DicomSource.looks_like(tree / "examples")


# ----------------------------------------------------------------------------- pixels
def test_colour_files_come_back_rgb(source):
    for name in ["examples_ybr_color.dcm", "examples_rgb_color.dcm", "examples_palette.dcm"]:
        loaded = by_name(source, name).load()
        assert loaded.image.dtype == np.uint8 and loaded.image.ndim == 3 and loaded.image.shape[2] == 3, name
        assert loaded.image.shape[:2] == (loaded.info["rows"], loaded.info["columns"])
        assert loaded.image.max() > 100
    # YBR_FULL_422 JPEG: pydicom converts to RGB, so grey pixels have equal channels
    ybr = by_name(source, "examples_ybr_color.dcm").load().image.astype(int)
    assert np.abs(ybr[..., 0] - ybr[..., 1]).mean() < 3
    # uncompressed YBR_FULL written here: back to the RGB it was made from
    back = by_name(source, "ybr_full.dcm").load().image.astype(int)
    assert np.abs(back[0, 20] - [200, 120, 40]).max() <= 2 and np.abs(back[0, 0] - 90).max() <= 2
    # grey stored as RGB comes back (H, W), losslessly
    grey = by_name(source, "grey_rgb.dcm").load()
    assert (
        grey.image.shape == (16, 24) and grey.image[0, -1] == 255 and grey.info["photometric_interpretation"] == "RGB"
    )


def test_jpeg2000_decodes_or_fails_with_a_clear_reason(source):
    item = by_name(source, "examples_jpeg2k.dcm")
    if get_decoder(JPEG2000Lossless).is_available:
        image = item.load().image
        assert image.dtype == np.uint8 and image.shape == (480, 640, 3)
    else:
        with pytest.raises(DicomDecodeError, match="JPEG 2000 pixel data needs .*pip install"):
            item.load()


def test_missing_decoder_fails_per_item_with_install_hint(source):
    item = by_name(source, "jpegls.dcm")  # JPEG-LS with junk data: no decoder here, or a decode error
    with pytest.raises(DicomDecodeError) as err:
        item.load()
    if not get_decoder(JPEGLSLossless).is_available:
        assert "JPEG-LS pixel data needs" in str(err.value) and "pip install" in str(err.value)


def test_monochrome2_window_and_monochrome1_inverted(source):
    loaded = by_name(source, "mono2_16bit.dcm").load()
    image = loaded.image
    assert image.dtype == np.uint8 and image.shape == (48, 64) and loaded.info["gray_mapping"] == "window"
    row = image[0].astype(int)
    # centre 1000, width 1000 over a 0..4000 ramp: <= 500 black, >= 1500 white, monotone between
    assert row[:8].max() == 0 and row[-40:].min() == 255 and np.all(np.diff(row) >= 0)
    mono1 = by_name(source, f"{PID}_mono1.dcm").load()
    assert mono1.image.shape == (48, 64) and mono1.info["photometric_interpretation"] == "MONOCHROME1"
    assert mono1.image[:, 40:].max() == 0 and mono1.image[:, :20].min() == 255  # stored high -> dark


def test_multi_frame_frames_stride_and_limit(tree):
    def frames(**options):
        item = by_name(DicomSource(tree, salt=SALT, **options), "cine")
        return list(item.frames())

    all_frames = frames()
    assert [f.info["frame"] for f in all_frames] == list(range(6))
    for k, f in enumerate(all_frames):
        assert f.image.dtype == np.uint8 and f.image.shape == (40, 56) and f.image[20, 30] == 20 * k
        assert f.info["number_of_frames"] == 6
    assert [f.info["frame"] for f in frames(frame_stride=2)] == [0, 2, 4]
    assert [f.info["frame"] for f in frames(frame_stride=2, max_frames=2)] == [0, 2]
    ybr = by_name(DicomSource(tree / "examples", salt=SALT, frame_stride=7), "examples_ybr_color.dcm")
    assert [f.info["frame"] for f in ybr.frames()] == [0, 7, 14, 21, 28]
    assert ybr.load().info["frame"] == 0
    # a single-frame file yields one image, without a frame index
    (single,) = list(by_name(DicomSource(tree / "examples", salt=SALT), "examples_rgb_color.dcm").frames())
    assert "frame" not in single.info


@pytest.mark.parametrize(
    "name, reason",
    [
        ("nopixels.dcm", "no pixel data"),
        ("truncated.dcm", "truncated"),
        ("header_cut.dcm", "transfer syntax"),
    ],
)
def test_broken_files_fail_per_item(source, name, reason):
    item = by_name(source, name)
    with pytest.raises(DicomDecodeError, match=reason) as err:
        item.load()
    with pytest.raises(DicomDecodeError):
        list(item.frames())
    assert not any(s in str(err.value) for s in SECRETS)


def test_deflated_and_rle_decode(tmp_path):
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

    write_dicom(tmp_path / "defl.dcm", gradient(32, 32), bits_stored=12, transfer_syntax=DeflatedExplicitVRLittleEndian)
    ds = pydicom.dcmread(write_dicom(tmp_path / "raw.dcm", gradient(32, 32), bits_stored=12))
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    src = DicomSource(tmp_path, salt=SALT)
    raw = by_name(src, "raw.dcm").load().image
    for name in ["defl.dcm", "rle.dcm"]:
        assert np.array_equal(by_name(src, name).load().image, raw), name


# ----------------------------------------------------------------------------- de-identification
def _everything_handed_out(source: DicomSource) -> str:
    """Every item field the writer uses, every Loaded.info, every failure reason, stats and grouping."""
    parts = [json.dumps(source.stats(), default=str), json.dumps(source.grouping()), json.dumps(source.classes)]
    for item in source:
        fields = {f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.name != "path"}
        parts.append(json.dumps(fields, default=str))
        try:
            parts.extend(json.dumps(f.info) for f in item.frames())
        except DicomDecodeError as exc:
            parts.append(str(exc))
    return "\n".join(parts)


def _found(secret: str, text: str) -> bool:
    """Case-insensitive; short secrets ('Doe') only as whole words, so 'does' is no leak."""
    if len(secret) >= 6:
        return secret.casefold() in text.casefold()
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", text, re.IGNORECASE) is not None


def test_nothing_identifying_is_handed_out(tree, source):
    text = _everything_handed_out(source)
    secrets = list(SECRETS)
    for path in (tree / "examples").iterdir():  # the identifying values of pydicom's real files too
        header = __import__("pydicom").dcmread(path, stop_before_pixels=True)
        for values in deid.identifying_values(header).values():
            secrets += [v for v in values if len(v) >= 6 or (len(v) >= 4 and not v.isdigit())]
    leaked = sorted({s for s in secrets if _found(s, text)})
    assert not leaked, leaked
    assert not re.search(r"\b1\.2\.826\.0\.1\.3680043\.", text)  # no generated UID (pydicom's root)


def test_paths_are_pseudonymised(source):
    patient = deid.pseudonym(SALT, "patient", PID)
    mono1 = by_name(source, f"{PID}_mono1.dcm")
    folder, name = mono1.source.split("/")
    assert folder == patient and name.startswith(patient + "-") and name.endswith(".dcm")
    assert by_name(source, "cine").source == f"{patient}/cine"
    assert by_name(source, "examples_palette.dcm").source == "examples/examples_palette.dcm"
    # the unreadable header: its folder is still replaced (patient ids known from the tree)
    assert by_name(source, "header_cut.dcm").source == f"{patient}/header_cut.dcm"


def test_grouping_uses_salted_pseudonyms(tree, source):
    patient = deid.pseudonym(SALT, "patient", PID)
    assert re.fullmatch(r"pat-[0-9a-f]{16}", patient)
    assert {by_name(source, n).group for n in ["mono2_16bit.dcm", "cine", f"{PID}_mono1.dcm"]} == {patient}
    assert by_name(source, "mono2_16bit.dcm").load().info["patient"] == patient
    assert by_name(source, "ct.dcm").group == deid.pseudonym(SALT, "patient", "PID-654321") != patient
    assert by_name(source, "header_cut.dcm").group.startswith("file-")  # no tags: its own group
    again = DicomSource(tree, salt=SALT)
    assert [it.group for it in again] == [it.group for it in source]
    other = DicomSource(tree, salt=OTHER_SALT)
    assert by_name(other, "cine").group != patient and by_name(other, "cine").key != by_name(source, "cine").key
    assert source.grouping()["salt_id"] != other.grouping()["salt_id"]
    studies = DicomSource(tree, salt=SALT, group_by="study")
    assert (
        by_name(studies, "cine").group.startswith("stu-")
        and by_name(studies, "cine").group != by_name(studies, "mono2_16bit.dcm").group
    )
    files = DicomSource(tree, salt=SALT, group_by="file")
    assert len({it.group for it in files}) == len(files)


def test_salt_file(tmp_path):
    path = tmp_path / "secret" / "salt"
    salt = deid.load_or_create_salt(path, output_dir=tmp_path / "shards")
    assert len(salt) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert deid.load_or_create_salt(path) == salt
    with pytest.raises(UserError, match="inside the output folder"):
        deid.load_or_create_salt(tmp_path / "shards" / "salt", output_dir=tmp_path / "shards")
    (tmp_path / "bad").write_bytes(b"short")
    with pytest.raises(UserError, match="not 32"):
        deid.load_or_create_salt(tmp_path / "bad")
    assert deid.pseudonym(salt, "patient", "x") == deid.pseudonym(salt, "patient", " x ")
    assert deid.pseudonym(salt, "patient", "x") != deid.pseudonym(salt, "study", "x")
    assert deid.pseudonym(salt, "patient", "x") != deid.pseudonym(OTHER_SALT, "patient", "x")


def test_source_uses_salt_path_and_refuses_it_in_output(tmp_path, tree):
    salt_path = tmp_path / "salt"
    one = DicomSource(tree / "examples", salt_path=salt_path)
    two = DicomSource(tree / "examples", salt_path=salt_path)
    assert [it.group for it in one] == [it.group for it in two]
    with pytest.raises(UserError, match="salt"):
        DicomSource(tree / "examples", salt_path=tmp_path / "out" / "salt", output_dir=tmp_path / "out")


def test_path_scrubber():
    scrubber = deid.PathScrubber(SALT)
    values = {"PatientName": ["Doe^Jane"], "PatientName:part": ["Doe", "Jane"], "AccessionNumber": ["ACC-778899"]}
    out = scrubber.scrub(f"cases/Doe_Jane/{PID}/acc778899/scan_{PID}.DCM", PID, values)
    parts = out.split("/")
    assert parts[0] == "cases" and parts[2] == deid.pseudonym(SALT, "patient", PID)
    assert all(p.startswith("pat-") for p in parts[1:]) and parts[4].endswith(".DCM")
    assert len(set(parts[1:])) == 4  # distinct components stay distinct
    assert scrubber.scrub("a/b.dcm", PID, values) == "a/b.dcm"
    assert scrubber.names_identifier("Doe Jane", PID, values) and not scrubber.names_identifier("doesnt", PID, values)


def test_removed_report_names_only():
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"), stop_before_pixels=True)
    report = deid.removed_report(ds)
    assert {"PatientName", "PatientID", "StudyInstanceUID"} <= set(report["identifying_tags"])
    assert str(ds.PatientID) not in json.dumps(report) and str(ds.PatientName) not in json.dumps(report)


# ----------------------------------------------------------------------------- labels and options
def test_class_folder_labels(tmp_path):
    root = tmp_path / "classes"
    for cls, n in [("benign", 2), ("malignant", 1)]:
        for i in range(n):
            write_dicom(
                root / cls / f"img{i}.dcm",
                gradient(16, 16),
                bits_stored=12,
                patient_id=f"P{cls}{i}",
                ReferringPhysicianName="Ben^Lee",
            )  # 'Ben' must not make 'benign' a patient folder
    src = open_source("dicom", root, group_pattern=None, exclude_pattern="_mask", salt=SALT)
    assert src.label_mode == "folders" and src.classes == ["benign", "malignant"]
    assert sorted((it.class_name, it.label) for it in src) == [("benign", 0), ("benign", 0), ("malignant", 1)]
    assert all(it.label == -1 for it in DicomSource(root, labels="none", salt=SALT))
    # a "class" folder named after a patient is refused when folders are asked for
    write_dicom(root / PID / "x.dcm", gradient(16, 16), bits_stored=12)
    with pytest.raises(UserError, match="named after an identifier"):
        DicomSource(root, labels="folders", salt=SALT)
    assert DicomSource(root, salt=SALT).label_mode == "none"


def test_bad_options_and_roots(tmp_path, tree):
    with pytest.raises(UserError, match="group pattern"):
        open_source("dicom", tree, group_pattern="p(\\d+)", salt=SALT)
    with pytest.raises(UserError, match="frame stride"):
        DicomSource(tree, frame_stride=0, salt=SALT)
    with pytest.raises(UserError, match="group_by"):
        DicomSource(tree, group_by="hospital", salt=SALT)
    with pytest.raises(UserError, match="does not exist"):
        DicomSource(tmp_path / "missing", salt=SALT)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="no DICOM files"):
        DicomSource(tmp_path / "empty", salt=SALT)
    with pytest.raises(UserError, match="sit directly"):
        DicomSource(tree / "examples", labels="folders", salt=SALT)


# ----------------------------------------------------------------------------- end to end
def _fan(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A sector of speckle on black with a bright text-like block outside it (8-bit)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    r, angle = np.hypot(xx - w / 2, yy + 10), np.degrees(np.arctan2(xx - w / 2, yy + 10))
    fan = (r > 20) & (r < h) & (np.abs(angle) < 40)
    image = np.where(fan, rng.gamma(2.0, 40.0, (h, w)).clip(0, 255), 0).astype(np.uint8)
    image[2:8, 2:30] = 255
    return image


def test_shards_hold_no_identifying_value(tmp_path, monkeypatch):
    """Through today's writer (grayscale, single-frame items via load(), labelled classes):
    no identifying string in any tar byte or in the manifest. Extend to colour, multi-frame and
    unlabelled trees once the writer calls frames() and takes RGB."""
    from usjepa.ingest.build.run import build_shards
    from usjepa.ingest.settings import BuildSettings

    salt_file = tmp_path / "keys" / "salt"  # a fixed salt: same splits and bytes every run
    salt_file.parent.mkdir()
    salt_file.write_bytes(SALT)
    salt_file.chmod(0o600)
    monkeypatch.setenv(deid.SALT_ENV, str(salt_file))  # the writer passes no salt yet
    src, out = tmp_path / "src", tmp_path / "out"
    for c, cls in enumerate(["benign", "malignant"]):
        for i in range(4):
            pid = f"{PID}{c}{i}"
            write_dicom(src / cls / pid / f"{pid}_scan.dcm", _fan(10 * c + i), patient_id=pid)
    write_dicom(src / "benign" / PID / f"{PID}_sr.dcm", None)  # skipped, with a reason in the manifest
    manifest = build_shards(
        src, out, BuildSettings(format="dicom", image_size=32, val_fraction=0.25, test_fraction=0.25), progress=False
    )
    assert manifest.total == 8 and len(manifest.skipped) == 1 and "no pixel data" in manifest.skipped[0]["reason"]
    produced = sorted(out.iterdir())
    assert any(p.suffix == ".tar" for p in produced) and (out / "manifest.json") in produced
    blob = b"".join(p.read_bytes() for p in produced)
    leaked = [s for s in SECRETS if s.encode() in blob or (len(s) >= 6 and s.lower().encode() in blob.lower())]
    assert not leaked and SALT not in blob, leaked
    assert all(m["group"].startswith("pat-") for m in _shard_metas(out))


def _shard_metas(out: Path) -> list[dict]:
    import tarfile

    metas = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return metas


def test_colour_multiframe_unlabelled_tree_leaks_nothing_into_shards(tree, tmp_path, monkeypatch):
    """The whole fixture tree (identifiers in folder and file names and in the tags, colour,
    YBR and palette files, a 30-frame cine, broken files), pydicom's own example files with
    their original identifying values: nothing identifying in any byte the build writes."""
    import pydicom

    from usjepa.ingest.build.run import build_shards
    from usjepa.ingest.settings import BuildSettings

    salt_file = tmp_path / "keys" / "salt"
    salt_file.parent.mkdir()
    salt_file.write_bytes(SALT)
    salt_file.chmod(0o600)
    monkeypatch.setenv(deid.SALT_ENV, str(salt_file))
    out = tmp_path / "out"
    manifest = build_shards(
        tree, out, BuildSettings(format="dicom", image_size=32, val_fraction=0.2, test_fraction=0.2), progress=False
    )
    metas = _shard_metas(out)
    assert manifest.total == len(metas) > 30  # the cine's frames are samples of their own
    assert any(m.get("frame") is not None for m in metas)
    assert all(m["label"] == -1 and m["group"].startswith("pat-") for m in metas)
    secrets = set(SECRETS)
    for name in EXAMPLES:
        ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
        secrets |= {v for values in deid.identifying_values(ds).values() for v in values if len(v) >= 4}
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    leaked = sorted(s for s in secrets if s.encode() in blob)
    assert not leaked and SALT not in blob, leaked


def test_build_hands_out_to_the_source_and_records_no_identifying_root(tmp_path, monkeypatch):
    """The build passes OUT as output_dir (a salt file inside it is refused) and records the
    root as the source's pseudonymised folder name (the export folder here is named after
    the patient)."""
    from usjepa.ingest.build.run import build_shards
    from usjepa.ingest.settings import BuildSettings

    src, out = tmp_path / PID, tmp_path / "out"
    for i in range(3):
        write_dicom(src / f"scan{i}.dcm", _fan(i))
    settings = BuildSettings(format="dicom", image_size=32, val_fraction=0, test_fraction=0)
    monkeypatch.setenv(deid.SALT_ENV, str(out / "keys" / "salt"))
    with pytest.raises(UserError, match="inside the output folder"):
        build_shards(src, out, settings, progress=False)
    monkeypatch.setenv(deid.SALT_ENV, str(tmp_path / "keys" / "salt"))
    manifest = build_shards(src, out, settings, progress=False)
    recorded = json.loads((out / "manifest.json").read_text())["source"]["root"]
    assert manifest.total == 3 and recorded == manifest.source_root
    assert recorded.startswith("pat-") and "123456" not in recorded
    assert "123456" not in (out / "build_report.json").read_text().replace(str(out), "")
