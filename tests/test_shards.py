"""Shard builder: image folder -> preprocessed WebDataset shards + manifest, and back."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from usjepa.errors import UserError
from usjepa.ingest.build.run import build_shards
from usjepa.ingest.build.splits import assign_splits
from usjepa.ingest.cli import register_cli
from usjepa.ingest.image.preprocess import PreprocessSettings, preprocess, stretch_percentiles
from usjepa.ingest.image.region import detect_region
from usjepa.ingest.settings import BuildSettings
from usjepa.ingest.sources.imagefile import pil_to_gray
from usjepa.ingest.verify import verify_shards
from usjepa.shardset.manifest import load_manifest
from usjepa.shardset.sample import decode_sample, encode_sample, make_key

BUSI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "busi" / "Dataset_BUSI_with_GT"


# ----------------------------------------------------------------------------- helpers
def fan_image(h: int = 120, w: int = 160, seed: int = 0, text: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A convex-probe-like sector of speckle on black, with text and calipers outside it.
    Returns (uint8 image, true fan mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    ax, ay = w / 2, -0.12 * h
    r = np.hypot(xx - ax, yy - ay)
    angle = np.degrees(np.arctan2(xx - ax, yy - ay))
    fan = (r > 0.25 * h) & (r < 1.05 * h) & (np.abs(angle) < 38)
    tissue = rng.gamma(2.0, 35.0, size=(h, w)) * np.clip(1.2 - yy / h, 0.2, 1.0)
    tissue[(xx - 0.45 * w) ** 2 + (yy - 0.6 * h) ** 2 < (0.08 * h) ** 2] *= 0.05  # dark cyst
    img = Image.fromarray(np.where(fan, np.clip(tissue, 0, 255), 0).astype(np.uint8))
    if text:
        draw = ImageDraw.Draw(img)
        draw.text((2, 2), "DEPTH 12cm", fill=255)
        draw.text((w - 30, h - 12), "L12", fill=230)
        draw.line([(4, h // 3), (4, h // 3 + 25)], fill=255)  # a ruler left of the fan
        draw.text((w - 12, 20), "+", fill=255)  # a caliper mark
    return np.asarray(img), fan


def make_folder(root: Path, patients: int = 4, frames: int = 2) -> dict[str, tuple[str, str]]:
    """root/<class>/p<id>_f<k>.<ext>, in several modes; returns {relative path: (class, group)}."""
    made = {}
    for c, cls in enumerate(["cyst", "normal", "solid"]):
        (root / cls).mkdir(parents=True)
        for p in range(patients):
            pid = f"p{c}{p}"
            for f in range(frames):
                gray, _ = fan_image(seed=100 * c + 10 * p + f)
                variant = (p + f) % 4
                if variant == 0:
                    name, img = f"{pid}_f{f}.png", Image.fromarray(gray)
                elif variant == 1:
                    name, img = f"{pid}_f{f}.png", Image.fromarray(np.stack([gray] * 3, -1))  # RGB
                elif variant == 2:
                    name, img = f"{pid}_f{f}.png", Image.fromarray(gray.astype(np.uint16) * 257)  # 16 bit
                else:
                    name, img = f"{pid} f{f} (jpeg).jpg", Image.fromarray(gray)
                img.save(root / cls / name)
                made[f"{cls}/{name}"] = (cls, pid)
    (root / "solid" / "p20_f0_mask.png").write_bytes((root / "solid" / "p20_f0.png").read_bytes())  # excluded
    (root / "solid" / "notes.txt").write_text("not an image")
    return made


def read_all(manifest) -> list[tuple[str, np.ndarray, np.ndarray, dict]]:
    """Every sample of every split, read the way a training pipeline does."""
    out = []
    for split in manifest.splits:
        urls = [str(p) for p in manifest.shard_paths(split)]
        if urls:
            for raw in wds.WebDataset(urls, shardshuffle=False):
                image, region, meta = decode_sample(raw)
                out.append((split, image, region, meta))
    return out


SMALL = dict(image_size=48, shard_size=5, group_pattern=r"^(p\d+)[_ ]")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("src")
    return root, make_folder(root)


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    root, made = folder
    out = tmp_path_factory.mktemp("shards")
    return build_shards(root, out, BuildSettings(**SMALL), progress=False), made


# ----------------------------------------------------------------------------- build
def test_round_trip_preserves_labels_groups_and_count(built):
    manifest, made = built
    assert manifest.classes == ["cyst", "normal", "solid"]
    samples = read_all(manifest)
    assert len(samples) == len(made) == manifest.total
    assert sorted(m["source"] for _, _, _, m in samples) == sorted(made)
    for split, image, region, meta in samples:
        cls, group = made[meta["source"]]
        assert meta["class_name"] == cls and manifest.classes[meta["label"]] == cls
        assert meta["group"] == group and meta["split"] == split
        assert image.dtype == np.uint8 and image.shape == (48, 48)  # single channel, requested size
        assert region.dtype == bool and region.shape == (48, 48) and region.mean() > 0.2
        assert (image[~region] == 0).all() and image[region].std() > 10  # stretched speckle
    for info in manifest.splits.values():
        assert all(1 <= s.count <= 5 for s in info.shards)
        assert info.count == sum(s.count for s in info.shards) == sum(info.class_counts.values())
    stats = json.loads((manifest.root / "manifest.json").read_text())["source"]
    assert stats["excluded"] == 1 and stats["non_image_files"] == 1
    assert {s["orig_mode"] for *_, s in samples} >= {"L", "RGB", "I;16"}


def test_splits_are_group_disjoint_and_deterministic(folder, built, tmp_path):
    root, made = folder
    first, _ = built
    again = build_shards(root, tmp_path / "again", BuildSettings(**SMALL), progress=False)
    a = json.loads((first.root / "manifest.json").read_text())
    b = json.loads((again.root / "manifest.json").read_text())
    a.pop("created"), b.pop("created")
    assert a == b
    for split in first.splits:
        for p, q in zip(first.shard_paths(split), again.shard_paths(split)):
            assert p.read_bytes() == q.read_bytes()
    groups = {}
    for split, *_, meta in read_all(first):
        groups.setdefault(meta["group"], set()).add(split)
    assert all(len(s) == 1 for s in groups.values())
    assert {s for v in groups.values() for s in v} == {"train", "val", "test"}
    # a shard mixes classes (the order within a split is shuffled)
    first_train = [m["class_name"] for split, *_, m in read_all(first) if split == "train"][:5]
    assert len(set(first_train)) > 1
    other = build_shards(root, tmp_path / "seed1", BuildSettings(**SMALL, seed=1), progress=False)
    assert {k: v.count for k, v in other.splits.items()} != {} and other.total == first.total
    assert json.loads((other.root / "manifest.json").read_text())["splits"] != a["splits"]


def test_assign_splits_fractions_per_class_and_group_integrity():
    rng = np.random.default_rng(0)
    members = []
    for g in range(400):
        members += [(f"pt{g}", int(rng.choice([0, 0, 0, 1, 1, 2])))] * int(rng.integers(1, 20))
    split_of = assign_splits(members, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert split_of == assign_splits(list(reversed(members)), 0.1, 0.2, seed=3)  # order-free
    assert split_of != assign_splits(members, 0.1, 0.2, seed=4)
    for label in (0, 1, 2):
        splits = [split_of[g] for g, lab in members if lab == label]
        for name, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
            assert abs(splits.count(name) / len(splits) - share) < 0.03


def test_interrupted_build_leaves_no_manifest_or_temp_files(folder, tmp_path, monkeypatch):
    import usjepa.ingest.build.item as work  # where the worker entry point looks process_item up

    root, made = folder
    real, calls, limit = work.process_item, [], [7]

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > limit[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(work, "process_item", failing)
    with pytest.raises(KeyboardInterrupt):
        build_shards(root, tmp_path / "out", BuildSettings(**SMALL), progress=False)
    names = [p.name for p in (tmp_path / "out").iterdir()]
    # only the resumable work folder is left: no manifest, no shards, no temporary tars
    assert names == [".work"]
    with pytest.raises(UserError, match="usjepa shards build"):
        load_manifest(tmp_path / "out")
    calls.clear()
    limit[0] = len(made)
    resumed = build_shards(root, tmp_path / "out", BuildSettings(**SMALL), progress=False)
    assert len(calls) == len(made) - 7  # the 7 finished items were not processed again
    assert resumed.total == len(made) and not (tmp_path / "out" / ".work").exists()


def test_group_pattern_mismatch_names_file_and_pattern(folder, tmp_path):
    root, _ = folder
    with pytest.raises(UserError, match=r"p\d.*does not match the group pattern 'patient_\(\\d\+\)'"):
        build_shards(root, tmp_path / "o", BuildSettings(group_pattern=r"patient_(\d+)"), progress=False)


def test_without_pattern_each_image_is_its_own_group(folder, tmp_path):
    root, made = folder
    m = build_shards(root, tmp_path / "o", BuildSettings(image_size=32), progress=False)
    assert m.grouping["mode"] == "per_image" and "own group" in m.grouping["note"]
    assert sum(s.groups for s in m.splits.values()) == len(made)


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(fan_image(seed=i)[0]).save(src / "a" / f"ok{i}.png")
    good = (src / "a" / "ok0.png").read_bytes()
    (src / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "a" / "garbage.png").write_bytes(b"this is not a png")
    (src / "a" / "blank.png").write_bytes(_png(np.zeros((64, 64), np.uint8)))
    m = build_shards(src, tmp_path / "out", BuildSettings(image_size=32), progress=False)
    assert m.total == 3
    reasons = {s["source"]: s["reason"] for s in m.skipped}
    assert set(reasons) == {"a/truncated.png", "a/garbage.png", "a/blank.png"}
    assert "unreadable" in reasons["a/garbage.png"] and "region" in reasons["a/blank.png"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_skipped"] == 3


def test_empty_or_missing_source_fails_at_once(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    for src in (tmp_path / "empty", tmp_path / "nope"):
        with pytest.raises(UserError) as err:
            build_shards(src, tmp_path / "out", BuildSettings(), progress=False)
        message = str(err.value)
        assert str(src) in message and "<class name>" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_existing_shard_set_needs_overwrite(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "out"
    build_shards(root, out, BuildSettings(**{**SMALL, "shard_size": 2}), progress=False)
    with pytest.raises(UserError, match="overwrite"):
        build_shards(root, out, BuildSettings(**SMALL), progress=False)
    m = build_shards(root, out, BuildSettings(**{**SMALL, "shard_size": 100}, overwrite=True), progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "build_report.json"] + [s.name for info in m.splits.values() for s in info.shards]
    )


# ----------------------------------------------------------------------------- verify
def test_verify_passes_then_catches_flipped_bytes(built, tmp_path):
    manifest, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(manifest.root, copy)
    report = verify_shards(copy)
    assert report["ok"] and report["samples"] == manifest.total
    shard = load_manifest(copy).shard_paths("train")[0]
    data = bytearray(shard.read_bytes())
    for i in range(1500, 1600):  # inside the first member's payload
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{shard.name}.*sha256") as err:
        verify_shards(copy)
    assert err.value.report["problems"]


def test_manifest_api_errors(built, tmp_path):
    manifest, _ = built
    assert all(p.is_absolute() and p.exists() for p in manifest.shard_paths("train"))
    assert manifest.count("train") + manifest.count("val") + manifest.count("test") == manifest.total
    with pytest.raises(UserError, match="known splits: train, val, test"):
        manifest.shard_paths("dev")
    with pytest.raises(UserError, match="usjepa shards build"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        load_manifest(tmp_path)


# ----------------------------------------------------------------------------- preprocessing
def test_region_detection_excludes_text_and_keeps_fan():
    image, fan = fan_image(h=240, w=320, seed=7)
    region = detect_region(image)
    text_pixels = (image > 200) & ~fan
    assert text_pixels.sum() > 100  # the test image does have text outside the fan
    assert not (region & text_pixels).any()
    assert (region & fan).sum() / fan.sum() > 0.98  # the dark cyst and deep tissue included
    assert (region & ~fan).sum() / fan.sum() < 0.05
    out = preprocess(image, PreprocessSettings(image_size=64))
    assert out.image.shape == out.region.shape == (64, 64)
    left, top, right, bottom = out.info["crop_box"]
    ys, xs = np.nonzero(fan)
    assert abs(left - xs.min()) <= 2 and abs(right - 1 - xs.max()) <= 2 and abs(top - ys.min()) <= 2


def test_percentile_stretch_is_measured_inside_the_region():
    rng = np.random.default_rng(0)
    image = np.full((50, 50), 255, np.uint8)  # bright annotations outside
    region = np.zeros((50, 50), bool)
    region[10:40, 10:40] = True
    image[region] = rng.integers(50, 101, region.sum())
    out, (lo, hi) = stretch_percentiles(image, region, 2, 98)
    assert (lo, hi) == tuple(np.percentile(image[region], [2, 98], method="inverted_cdf"))
    assert 50 <= lo <= 53 and 97 <= hi <= 100
    inside = out[region]
    assert inside.min() == 0 and inside.max() == 255
    assert 0.01 <= (inside == 0).mean() <= 0.05 and 0.01 <= (inside == 255).mean() <= 0.05
    assert (out[~region] == 0).all()


def test_grayscale_conversion_never_keeps_colour():
    red = Image.new("RGB", (20, 20), (255, 0, 0))
    gray, info = pil_to_gray(red)
    assert gray.shape == (20, 20) and gray.dtype == np.uint8 and int(gray[0, 0]) == 76  # 0.299 * 255
    assert info["orig_mode"] == "RGB" and info["color_fraction"] == 1.0
    deep = Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16))
    assert pil_to_gray(deep)[0].tolist() == [[0, 64], [128, 255]]


def test_sample_format_round_trip_and_corrupt_data():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    region = image > 10
    meta = {"label": 1, "class_name": "b", "group": "g", "source": "b/x (1).png", "split": "train"}
    key = make_key("b/x (1).png")
    assert key.replace("-", "_").replace("_", "").isalnum() and "." not in key
    assert make_key("b/x_1_.png") != key  # same readable part, different path
    sample = encode_sample(key, image, region, meta)
    img2, reg2, meta2 = decode_sample(sample)
    assert (img2 == image).all() and (reg2 == region).all() and meta2 == meta
    with pytest.raises(ValueError, match=key):
        decode_sample({**sample, "png": sample["png"][:30]})
    with pytest.raises(ValueError, match=key):
        decode_sample({**sample, "png": _png(np.zeros((8, 8, 3), np.uint8))})  # RGB is refused
    with pytest.raises(ValueError, match=key):
        decode_sample({**sample, "json": b"{"})


# ----------------------------------------------------------------------------- CLI and real data
def test_cli_build_and_verify(folder, tmp_path, capsys):
    root, made = folder
    parser = argparse.ArgumentParser(prog="usjepa")
    register_cli(parser.add_subparsers())
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["shards", "build", str(root), str(out), "--size", "32", "--group-pattern", r"^(p\d+)[_ ]", "--no-progress"]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert f"built {len(made)} samples" in text and "images/s" in text and "cyst" in text
    args = parser.parse_args(["shards", "verify", str(out)])
    assert args.func(args) == 0 and "ok:" in capsys.readouterr().out


@pytest.mark.skipif(not BUSI.is_dir(), reason=f"BUSI data not found at {BUSI}")
def test_build_real_busi_images(tmp_path):
    src = tmp_path / "busi"
    for cls in ("benign", "malignant", "normal"):
        (src / cls).mkdir(parents=True)
        files = sorted(p for p in (BUSI / cls).glob("*.png") if "_mask" not in p.name)[:10]
        for p in files:
            (src / cls / p.name).symlink_to(p)
    m = build_shards(src, tmp_path / "out", BuildSettings(image_size=64, shard_size=8), progress=False)
    assert m.classes == ["benign", "malignant", "normal"] and m.total == 30 and not m.skipped
    assert verify_shards(tmp_path / "out")["ok"]
    for _, image, region, meta in read_all(m):
        assert image.shape == (64, 64) and region.mean() > 0.5 and image[region].std() > 20
        assert meta["orig_mode"] == "RGB" and " " in meta["source"]


def _png(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
