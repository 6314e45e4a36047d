"""CSV manifests, file-name labels, the UltraBench layout and ingest recipes, on real files."""

import json
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usjepa.errors import UserError
from usjepa.ingest.build.run import build_shards
from usjepa.ingest.recipes import load_recipe, parse_assignments, read_recipe
from usjepa.ingest.settings import BuildSettings
from usjepa.ingest.sources import SOURCES, open_source
from usjepa.ingest.sources.base import UNLABELLED
from usjepa.ingest.sources.csv import CsvSource
from usjepa.ingest.sources.filenames import FilenameSource
from usjepa.ingest.sources.listed import canonical_labels
from usjepa.ingest.sources.ultrabench import UltraBenchSource
from usjepa.ingest.sources.video import VideoItem

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BUSI = DATA / "busi" / "Dataset_BUSI_with_GT"
COVID_BLUES = DATA / "covid-blues"
DUMMY = {
    "ULTRABENCH": "/nonexistent/ultrabench",
    "COVID_BLUES": "/nonexistent/covid-blues",
    "BUSI": "/nonexistent/busi",
    "POCUS_REPO": "/nonexistent/pocus",
}


def png(path: Path, size=(24, 20), value=None, mode="L") -> Path:
    """A real image file: noise (or a constant) inside a bright box on black."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    h, w = size
    arr = np.zeros((h, w), np.uint8)
    arr[2:-2, 3:-3] = rng.integers(40, 255, (h - 4, w - 6)) if value is None else value
    img = Image.fromarray(arr)
    if mode != "L":
        img = img.convert(mode)
    img.save(path)
    return path


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.lstrip(), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- csv
def test_csv_relative_absolute_paths_and_named_columns(tmp_path):
    png(tmp_path / "data" / "img" / "a (1).png")
    png(tmp_path / "data" / "img" / "b.png")
    outside = png(tmp_path / "elsewhere" / "c.jpg")
    csv_path = write_csv(
        tmp_path / "data" / "labels.csv",
        f"""
Filename,Diagnosis,Patient ID,Split,notes
img/a (1).png,benign,p1,Training,first
img/b.png, malignant ,p2,VALID,
{outside},benign,p1,test,"quoted, with comma"
""",
    )
    # a folder holding exactly one CSV; column names match ignoring case and punctuation ("Split")
    src = CsvSource(tmp_path / "data", path_column="filename", label_column="Diagnosis", group_column="patient_id")
    assert src.csv_path == csv_path
    assert src.stats()["columns"] == {"path": "Filename", "label": "Diagnosis", "group": "Patient ID", "split": "Split"}
    items = list(src)
    assert [it.source for it in items] == ["img/a (1).png", "img/b.png", outside.as_posix()]
    assert src.classes == ["benign", "malignant"]
    assert [(it.label, it.class_name, it.group, it.split) for it in items] == [
        (0, "benign", "p1", "train"),
        (1, "malignant", "p2", "val"),
        (0, "benign", "p1", "test"),
    ]
    assert len({it.key for it in items}) == 3
    loaded = items[2].load()
    assert loaded.image.dtype == np.uint8 and loaded.image.shape == (24, 20) and loaded.region is None
    assert src.grouping()["mode"] == "column"
    assert CsvSource.looks_like(csv_path) and not CsvSource.looks_like(tmp_path / "data")


def test_csv_missing_files(tmp_path):
    png(tmp_path / "ok.png")
    write_csv(tmp_path / "list.csv", "path,label\nok.png,a\ngone.png,b\n")
    src = CsvSource(tmp_path / "list.csv")
    assert len(src) == 2 and src.stats()["missing_files"] == 1 and src.stats()["missing_examples"] == ["gone.png"]
    missing = next(it for it in src if it.source == "gone.png")
    with pytest.raises(FileNotFoundError):
        missing.load()
    write_csv(tmp_path / "none" / "list.csv", "path\nx1.png\nx2.png\nx3.png\nx4.png\n")
    with pytest.raises(UserError, match=r"none of the 4 files .*x1\.png.*x2\.png.*x3\.png"):
        CsvSource(tmp_path / "none" / "list.csv")


def test_csv_prescribed_splits_and_bad_values(tmp_path):
    for name in "abcd":
        png(tmp_path / f"{name}.png")
    write_csv(tmp_path / "s.csv", "file,fold\na.png,train\nb.png,Validation\nc.png,TESTING\nd.png,dev\n")
    assert [it.split for it in CsvSource(tmp_path / "s.csv", path_column="file", split_column="fold")] == [
        "train",
        "val",
        "test",
        "val",
    ]
    write_csv(tmp_path / "bad.csv", "file,split\na.png,train\nb.png,holdout\n")
    with pytest.raises(UserError, match=r"line 3: split 'holdout'"):
        CsvSource(tmp_path / "bad.csv", path_column="file")
    # split_column=None ignores the column: the writer assigns splits by group
    assert {it.split for it in CsvSource(tmp_path / "bad.csv", path_column="file", split_column=None)} == {None}


def test_csv_column_errors_and_options(tmp_path):
    png(tmp_path / "a.png")
    write_csv(tmp_path / "x.csv", "where,what\na.png,cat\n")
    with pytest.raises(UserError, match=r"has no path column 'path'; its columns are: where, what; set path_column"):
        CsvSource(tmp_path / "x.csv")  # columns are never guessed
    with pytest.raises(UserError, match=r"no label column 'kind'; its columns are: where, what"):
        CsvSource(tmp_path / "x.csv", path_column="where", label_column="kind")
    src = CsvSource(tmp_path / "x.csv", path_column="where", label_column="what")
    assert [(it.label, it.class_name) for it in src] == [(0, "cat")]
    # no label column: unlabelled
    unlabelled = CsvSource(tmp_path / "x.csv", path_column="where")
    assert unlabelled.classes == [] and [(it.label, it.class_name) for it in unlabelled] == [(-1, UNLABELLED)]
    up = CsvSource(write_csv(tmp_path / "sub" / "up.csv", "path\n../a.png\n"))  # outside the CSV's folder
    assert next(iter(up)).source == (tmp_path / "a.png").as_posix() and up.stats()["missing_files"] == 0
    write_csv(tmp_path / "dup" / "d.csv", f"path\n{tmp_path / 'a.png'}\n{tmp_path / 'a.png'}\n")
    with pytest.raises(UserError, match=r"twice \(lines 2 and 3\)"):
        CsvSource(tmp_path / "dup")
    write_csv(tmp_path / "two" / "1.csv", "path\n")
    write_csv(tmp_path / "two" / "2.csv", "path\n")
    with pytest.raises(UserError, match=r"holds 2 CSV files \(1\.csv, 2\.csv\)"):
        CsvSource(tmp_path / "two")


def test_csv_numeric_labels_groups_from_pattern_and_semicolons(tmp_path):
    rows = []
    for i, score in enumerate(["2.0", "10.0", "9.0", "2.0", "0.5"]):
        png(tmp_path / "imgs" / f"patient_{i % 2}_{i}.png")
        rows.append(f"imgs/patient_{i % 2}_{i};{score}")
    write_csv(tmp_path / "m.csv", "image;score\n" + "\n".join(rows) + "\n")
    src = CsvSource(tmp_path / "m.csv", path_column="image", label_column="score", group_pattern=r"patient_(\d+)_")
    assert src.classes == ["0.5", "2", "9", "10"]  # numeric order; integral floats lose '.0'
    assert [it.class_name for it in src] == ["2", "10", "9", "2", "0.5"]
    assert [it.group for it in src] == ["0", "1", "0", "1", "0"]  # suffix-less paths found by stem
    assert next(iter(src)).source == "imgs/patient_0_0.png"
    assert canonical_labels(["b", "a", "b"]) == (["a", "b"], {"a": "a", "b": "b"})


def test_csv_lists_videos(tmp_path):
    (tmp_path / "vids").mkdir()
    for name in ("patient_1_R1", "patient_1_L1", "patient_2_R1"):
        (tmp_path / "vids" / f"{name}.mp4").write_bytes(b"not really a video")
    write_csv(
        tmp_path / "severity.csv",
        "video_file,Severity Score,B-lines\npatient_1_R1,2.0,yes\npatient_1_L1,0.0,no \npatient_2_R1,1.0,yes\n",
    )
    src = CsvSource(
        tmp_path,
        path_column="video_file",
        path_root="vids",
        path_suffix="mp4",
        label_column="B-lines",
        group_pattern=r"patient_(\d+)",
        fps=3,
        max_frames=30,
    )
    items = list(src)
    assert all(isinstance(it, VideoItem) for it in items)
    assert [it.source for it in items] == ["vids/patient_1_R1.mp4", "vids/patient_1_L1.mp4", "vids/patient_2_R1.mp4"]
    assert [it.class_name for it in items] == ["yes", "no", "yes"] and src.stats()["videos"] == 3
    assert [it.group for it in items] == ["1", "1", "2"]
    with pytest.raises(ValueError):  # the files are not real videos: a per-item failure
        items[0].load()
    assert items[0].settings.fps == 3 and items[0].settings.max_frames == 30
    with pytest.raises(UserError, match="fps"):
        CsvSource(tmp_path, path_column="video_file", path_root="vids", path_suffix=".mp4", fps=-1)


@pytest.mark.skipif(not BUSI.is_dir(), reason=f"BUSI not found at {BUSI} (shared data absent)")
def test_busi_all_captions_csv_resolves_and_loads():
    src = open_source("csv", BUSI / "all_captions.csv", path_column="image_path")
    items = list(src)
    assert len(items) == 780 and src.stats()["missing_files"] == 0
    assert src.classes == ["benign", "malignant", "normal"]
    counts = {c: sum(it.class_name == c for it in items) for c in src.classes}
    assert counts == {"benign": 437, "malignant": 210, "normal": 133}
    assert items[0].source == "benign/benign (1).png" and src.grouping()["mode"] == "per_image"
    for item in items[:: len(items) // 4]:
        loaded = item.load()
        assert loaded.image.dtype == np.uint8 and loaded.image.ndim == 2 and min(loaded.image.shape) > 0


@pytest.mark.skipif(not (COVID_BLUES / "severity.csv").is_file(), reason=f"COVID-BLUES not found at {COVID_BLUES}")
def test_covid_blues_recipe_lists_videos_by_patient():
    src_path, settings, options = load_recipe(
        REPO / "shards" / "covid_blues.yaml", {"COVID_BLUES": str(COVID_BLUES)}, environ={}
    )
    src = open_source(settings.format, src_path, **options)
    items = list(src)
    assert len(items) == 362 and src.stats()["missing_files"] == 0 and src.stats()["videos"] == 362
    assert src.classes == ["no", "yes"]
    assert sum(it.class_name == "yes" for it in items) == 235
    assert len({it.group for it in items}) == 63
    severity = read_recipe(
        REPO / "shards" / "covid_blues.yaml",
        {"COVID_BLUES": str(COVID_BLUES), "COVID_BLUES_LABEL": "Severity Score"},
        environ={},
    )
    assert open_source("csv", severity["source"], **severity["options"]).classes == ["0", "1", "2", "3"]
    zone = read_recipe(REPO / "shards" / "covid_blues_zone.yaml", {"COVID_BLUES": str(COVID_BLUES)}, environ={})
    zone_items = list(open_source("csv", zone["source"], **zone["options"]))
    assert [sum(it.class_name == c for it in zone_items) for c in ("1", "2", "3")] == [129, 118, 115]
    assert {it.group for it in zone_items} == {it.group for it in items}


def test_csv_labels_from_a_file_name_pattern(tmp_path):
    for name in ("p1_R1", "p1_L3", "p2_R3"):
        Image.new("L", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "list.csv").write_text("file\np1_R1.png\np1_L3.png\np2_R3.png\n")
    src = CsvSource(tmp_path / "list.csv", path_column="file", label_pattern=r"_[LR](\d)", group_pattern=r"^(p\d)_")
    assert src.classes == ["1", "3"] and [it.class_name for it in src] == ["1", "3", "3"]
    assert [it.label for it in src] == [0, 1, 1] and [it.group for it in src] == ["p1", "p1", "p2"]
    (tmp_path / "list.csv").write_text("file\np1_R1.png\np1_X.png\n")
    Image.new("L", (8, 8)).save(tmp_path / "p1_X.png")
    with pytest.raises(UserError, match=r"line 3: 'p1_X.png' .* does not match the label pattern"):
        CsvSource(tmp_path / "list.csv", path_column="file", label_pattern=r"_[LR](\d)")
    with pytest.raises(UserError, match="label_column 'file' and label_pattern .* both give labels"):
        CsvSource(tmp_path / "list.csv", path_column="file", label_column="file", label_pattern=r"_[LR](\d)")


# ---------------------------------------------------------------------------- filenames
def test_filenames_source_labels_from_prefixes(tmp_path):
    images, videos = tmp_path / "data" / "pocus_images" / "convex", tmp_path / "data" / "pocus_videos" / "convex"
    for name in ("Cov_a.png", "Pneu_b.jpg", "pneu-c.png", "Reg_d.png", "Normal_e.png", "Vir_f.png"):
        png(images / name)
    videos.mkdir(parents=True)
    for name in ("Cov-v1.mp4", "Reg_v2.gif", "Vir_v3.avi", "notes.txt"):
        (videos / name).write_bytes(b"x")
    src = FilenameSource(
        tmp_path,
        images=["data/pocus_images/convex"],
        videos="data/pocus_videos/convex",
        label_from_prefix={"cov": "covid", "pneu": "pneumonia", "reg": "regular", "normal": "regular"},
    )
    items = {Path(it.source).name: it for it in src}
    assert src.classes == ["covid", "pneumonia", "regular"]
    assert {n: it.class_name for n, it in items.items()} == {
        "Cov_a.png": "covid",
        "Pneu_b.jpg": "pneumonia",
        "pneu-c.png": "pneumonia",
        "Reg_d.png": "regular",
        "Normal_e.png": "regular",
        "Cov-v1.mp4": "covid",
        "Reg_v2.gif": "regular",
    }
    assert isinstance(items["Reg_v2.gif"], VideoItem) and items["Cov_a.png"].load().image.ndim == 2
    assert src.stats()["unmatched"] == 2 and len({it.group for it in src}) == len(items)
    with pytest.raises(UserError, match="match no prefix"):
        FilenameSource(
            tmp_path, images=["data/pocus_images/convex"], label_from_prefix={"cov": "covid"}, unmatched="error"
        )


# ---------------------------------------------------------------------------- ultrabench
def mask_png(path: Path, size=(20, 24)) -> Path:
    """An ultrabench-style scan mask: uint8 0/1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(size, np.uint8)
    arr[4:16, 5:19] = 1
    Image.fromarray(arr).save(path)
    return path


def ultrabench_layout(root: Path, variant: str) -> Path:
    """A small fake UltraBench set: 12 train(+val) images of 6 patients, 4 test images."""
    records = {}
    for split, n in (("trainval", 12), ("test", 4)):
        recs = []
        for i in range(n):
            name = f"{split}_{i}"
            png(root / "images" / f"{name}.png", size=(20, 24))
            if not (split == "test" and i == 3):  # one image without a scan mask
                mask_png(root / "masks" / "scan" / f"{name}.png")
            label = i % 2
            recs.append(
                {
                    "patient": i // 2 if split == "trainval" else 100 + i,
                    "image": f"images/{name}.png",
                    "scan_mask": f"masks/scan/{name}.png",
                    "label": label,
                    "pathology": ["Normal", "NFLD"][label],
                    "steatosis": 3,
                }
            )
        records[split] = recs
    if variant == "train_val":
        (root / "train_val.json").write_text(json.dumps(records["trainval"], indent=4))
        (root / "test.json").write_text(json.dumps(records["test"]))
    else:  # release 1.0.1: three files; also exercise the {"records": [...]} shape
        (root / "train.json").write_text(json.dumps(records["trainval"][:10]))
        (root / "validation.json").write_text(json.dumps({"records": records["trainval"][10:]}))
        (root / "test.json").write_text(json.dumps(records["test"]))
    return root


def test_ultrabench_three_files(tmp_path):
    root = ultrabench_layout(tmp_path / "fatty_liver", "three")
    assert UltraBenchSource.looks_like(root)
    src = open_source("ultrabench", root)
    items = list(src)
    assert len(items) == 16 and src.classes == ["Normal", "NFLD"]  # ordered by the integer label
    assert [it.split for it in items] == ["train"] * 10 + ["val"] * 2 + ["test"] * 4
    assert [it.label for it in items[:4]] == [0, 1, 0, 1] and items[1].class_name == "NFLD"
    assert items[0].group == "0" and items[0].source == "images/trainval_0.png"
    loaded = items[0].load()
    assert loaded.region is not None and loaded.region.dtype == bool and loaded.region.shape == loaded.image.shape
    assert loaded.region.sum() == 12 * 14 and loaded.info["scan_mask"] == "file"
    assert items[-1].load().region is None  # no mask file: the writer detects the region
    assert src.stats()["scan_masks_missing"] == 1 and src.stats()["layout"] == "train+validation+test"


def test_ultrabench_train_val_split_by_group(tmp_path):
    root = ultrabench_layout(tmp_path / "set", "train_val")
    src = UltraBenchSource(root, val_fraction=0.3)
    items = list(src)
    assert {it.split for it in items} == {"train", "val", "test"}
    assert sum(it.split == "test" for it in items) == 4
    split_of_group = {}
    for it in items:
        assert split_of_group.setdefault(it.group, it.split) == it.split  # a patient on one side only
    n_val = sum(it.split == "val" for it in items)
    assert 2 <= n_val <= 6
    again = [it.split for it in UltraBenchSource(root, val_fraction=0.3)]
    assert again == [it.split for it in items]  # deterministic
    assert src.grouping()["val_from_train"]["val_fraction"] == 0.3


def test_ultrabench_shapes_masks_by_stem_and_names(tmp_path):
    root = tmp_path / "aul"
    for i, cls in enumerate(["benign", "normal", "malignant"]):
        png(root / "images" / f"{cls}_{i}.jpg", size=(20, 24), mode="RGB")
        mask_png(root / "masks" / "scan" / f"{cls}_{i}.png")  # same stem, other suffix (AUL)
    png(root / "images" / "normal_9.jpg", size=(20, 24))
    (root / "train.json").write_text(
        json.dumps({"benign_0.jpg": {"class": "benign"}, "normal_1.jpg": {"class": "normal"}})
    )
    (root / "validation.json").write_text(json.dumps([{"file_name": "images\\normal_9.jpg", "class": "normal"}]))
    (root / "test.json").write_text(json.dumps({"data": [{"image": "malignant_2.jpg", "class": "malignant"}]}))
    src = UltraBenchSource(root)
    assert src.classes == ["benign", "malignant", "normal"]  # no integer labels: sorted names
    by_name = {Path(it.source).name: it for it in src}
    assert by_name["malignant_2.jpg"].split == "test" and by_name["normal_9.jpg"].split == "val"
    assert by_name["benign_0.jpg"].load().region.any()
    assert by_name["normal_9.jpg"].load().region is None


def test_ultrabench_errors(tmp_path):
    root = ultrabench_layout(tmp_path / "dup", "train_val")
    test = json.loads((root / "test.json").read_text())
    test.append({"image": "images/trainval_3.png", "label": 1})
    (root / "test.json").write_text(json.dumps(test))
    with pytest.raises(
        UserError,
        match=r"'images/trainval_3.png' is listed twice .*train_val.json record 3 and "
        r"test.json record 4",
    ):
        UltraBenchSource(root)

    root = ultrabench_layout(tmp_path / "nokey", "train_val")
    (root / "test.json").write_text(json.dumps([{"picture": "images/test_0.png", "label": 0}]))
    with pytest.raises(UserError, match=r"test.json record 0 has no image path .*it has keys: picture, label"):
        UltraBenchSource(root)

    root = ultrabench_layout(tmp_path / "nolabel", "train_val")
    (root / "test.json").write_text(json.dumps([{"image": "images/test_0.png", "bbox": [1, 2]}]))
    with pytest.raises(UserError, match=r"test.json record 0 has no label .*it has keys: image, bbox"):
        UltraBenchSource(root)

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no UltraBench split files .*train_val.json \+ test.json"):
        UltraBenchSource(tmp_path / "empty")
    root = ultrabench_layout(tmp_path / "both", "train_val")
    (root / "train.json").write_text("[]")
    with pytest.raises(UserError, match="keep one layout"):
        UltraBenchSource(root)


def test_built_shards_from_csv_and_ultrabench(tmp_path):
    for i in range(6):
        png(tmp_path / "csv" / f"img_{i}.png", size=(40, 48))
    write_csv(tmp_path / "csv" / "list.csv", "file,what\n" + "".join(f"img_{i}.png,{'ab'[i % 2]}\n" for i in range(6)))
    recipe = write_recipe(
        tmp_path,
        "format: csv\nsource: ${D}/list.csv\noptions: {path_column: file, label_column: what}\n"
        "build: {image_size: 16}\n",
    )
    src, settings, _ = load_recipe(recipe, {"D": str(tmp_path / "csv")}, environ={})
    manifest = build_shards(src, tmp_path / "out_csv", settings, progress=False)
    assert manifest.total == 6 and manifest.classes == ["a", "b"]
    root = ultrabench_layout(tmp_path / "ub", "three")
    manifest = build_shards(
        root, tmp_path / "out_ub", BuildSettings(image_size=16, format="ultrabench"), progress=False
    )
    assert manifest.total == 16 and manifest.classes == ["Normal", "NFLD"]
    assert {s: manifest.splits[s].count for s in ("train", "val", "test")} == {"train": 10, "val": 2, "test": 4}


def test_csv_build_keeps_listed_files_named_like_masks(tmp_path):
    """The build's default exclude pattern ('_mask': BUSI's lesion masks in image folders)
    is not handed to a csv source: every file the list names is ingested."""
    for name in ("scan.png", "scan_mask.png"):
        png(tmp_path / "csv" / name, size=(40, 48))
    listing = write_csv(tmp_path / "csv" / "list.csv", "path\nscan.png\nscan_mask.png\n")
    manifest = build_shards(listing, tmp_path / "out", BuildSettings(image_size=16, format="csv"), progress=False)
    assert manifest.total == 2 and "exclude_pattern" not in manifest.source_stats["options"]
    assert manifest.source_stats["exclude_pattern"] is None


# ---------------------------------------------------------------------------- recipes
def test_recipes_register_the_formats_they_need(tmp_path):
    """In a fresh interpreter, loading a recipe registers csv, filenames and ultrabench."""
    code = (
        "from usjepa.ingest.recipes import load_recipe; from usjepa.ingest.sources import SOURCES; "
        f"load_recipe({str(REPO / 'shards' / 'pocus_raw.yaml')!r}, {{'POCUS_REPO': '/x'}}, environ={{}}); "
        "print(sorted(SOURCES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert {"csv", "filenames", "ultrabench", "imagefolder"} <= set(eval(out))


@pytest.mark.parametrize("recipe", sorted((REPO / "shards").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads(recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shipped recipes use only settings the build honours
        r = read_recipe(recipe, DUMMY, environ={})
    src, settings, options = load_recipe(recipe, DUMMY, environ={})
    assert r["format"] in SOURCES and settings.format == r["format"] and settings.image_size == 224
    assert str(src).startswith("/nonexistent/") and isinstance(options, dict)
    assert r["name"] == recipe.stem
    text = recipe.read_text()
    assert "Expected" in text  # each recipe documents the counts to expect


def write_recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text.lstrip())
    return path


def test_recipe_errors_and_placeholders(tmp_path):
    base = "format: csv\nsource: ${DATA}/x.csv\n"
    with pytest.raises(UserError, match=r"needs DATA .*environment variable DATA=.*--set DATA="):
        load_recipe(write_recipe(tmp_path, base), {}, environ={})
    src, settings, options = load_recipe(write_recipe(tmp_path, base), {}, environ={"DATA": "/env"})
    assert src == Path("/env/x.csv") and settings.format == "csv" and options == {}
    src, _, _ = load_recipe(write_recipe(tmp_path, base), {"DATA": "/set"}, environ={"DATA": "/env"})
    assert src == Path("/set/x.csv")  # --set wins over the environment
    with pytest.raises(UserError, match=r"unknown recipe key 'buld'; did you mean 'build'\?"):
        load_recipe(write_recipe(tmp_path, base + "buld: {}\n"), {"DATA": "/d"}, environ={})
    with pytest.raises(UserError, match=r"unknown key 'build.img_size'; did you mean 'build.image_size'\?"):
        load_recipe(write_recipe(tmp_path, base + "build: {img_size: 64}\n"), {"DATA": "/d"}, environ={})
    with pytest.raises(
        UserError,
        match=r"source format 'csv': unknown key 'options.label_colum'; did you mean "
        r"'options.label_column'",
    ):
        load_recipe(write_recipe(tmp_path, base + "options: {label_colum: x}\n"), {"DATA": "/d"}, environ={})
    with pytest.raises(UserError, match=r"unknown format 'cvs'; did you mean 'csv'\?"):
        load_recipe(write_recipe(tmp_path, "format: cvs\nsource: /x\n"), {}, environ={})
    with pytest.raises(UserError, match=r"has no 'source'"):
        load_recipe(write_recipe(tmp_path, "format: csv\n"), {}, environ={})
    with pytest.raises(UserError, match=r"build.image_size: expected int, got 'big'"):
        load_recipe(write_recipe(tmp_path, base + "build: {image_size: big}\n"), {"DATA": "/d"}, environ={})
    with pytest.raises(UserError, match=r"invalid shard build settings: image size 4"):
        load_recipe(write_recipe(tmp_path, base + "build: {image_size: 4}\n"), {"DATA": "/d"}, environ={})
    # a placeholder alone is typed; defaults; literal $${...}; fps goes to a source that takes it
    path = write_recipe(
        tmp_path,
        base + "options: {label_column: '${LABEL:-dx}', group_pattern: 'p_(\\d+)$${x}'}\n"
        "build: {image_size: '${SIZE}', fps: 3, region: {threshold: 2}}\n",
    )
    src, settings, options = load_recipe(path, {"DATA": "/d", "SIZE": "64"}, environ={})
    assert settings.image_size == 64 and settings.region.threshold == 2.0
    assert options == {"label_column": "dx", "group_pattern": "p_(\\d+)${x}", "fps": 3}
    assert settings.source_options == options  # what build_shards passes to the source
    with pytest.warns(UserWarning, match=r"fps=2 do not apply to format imagefolder"):
        _, settings, options = load_recipe(
            write_recipe(tmp_path, "format: imagefolder\nsource: /x\nbuild: {max_samples: 10, fps: 2}\n"),
            {},
            environ={},
        )
    assert settings.max_samples == 10 and options == {}
    with pytest.raises(UserError, match=r"unknown key 'build.region.treshold'; did you mean 'build.region.threshold'"):
        load_recipe(write_recipe(tmp_path, base + "build: {region: {treshold: 2}}\n"), {"DATA": "/d"}, environ={})
    with pytest.raises(UserError, match=r"fps is set both under build and under options"):
        load_recipe(write_recipe(tmp_path, base + "options: {fps: 2}\nbuild: {fps: 3}\n"), {"DATA": "/d"}, environ={})
    assert parse_assignments(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(UserError, match="NAME=value"):
        parse_assignments(["novalue"])
