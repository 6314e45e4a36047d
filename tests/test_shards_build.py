"""Shard builder at scale and under stress: kill -9 and resume, worker counts, colour overlays,
duplicates, sample caps, corrupt inputs, multi-frame items and prescribed splits, format
auto-detection, the contact sheet, recipes. Real files and real processes, a few seconds each."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from usjepa.errors import UserError
from usjepa.ingest.build.run import build_shards, run_build
from usjepa.ingest.cli import register_cli
from usjepa.ingest.image.overlay import OverlaySettings, colour_mask, to_gray
from usjepa.ingest.inspect import contact_sheet
from usjepa.ingest.settings import BuildSettings
from usjepa.ingest.sources import base as sources_module
from usjepa.ingest.sources.base import Loaded, Source, SourceItem
from usjepa.ingest.sources.detect import detect_format
from usjepa.ingest.sources.imagefile import load_image
from usjepa.ingest.verify import verify_shards
from usjepa.shardset.manifest import REPORT_NAME, load_manifest
from usjepa.shardset.sample import decode_sample, make_key

ROOT = Path(__file__).resolve().parents[1]
BUSI = ROOT.parent / "shared" / "data" / "busi" / "Dataset_BUSI_with_GT"


# ----------------------------------------------------------------------------- helpers
def fan(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """A sector of speckle on black with a little text outside it (uint8 HxW)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(xx - w / 2, yy + 0.12 * h)
    angle = np.degrees(np.arctan2(xx - w / 2, yy + 0.12 * h))
    sector = (r > 0.25 * h) & (r < 1.05 * h) & (np.abs(angle) < 38)
    tissue = rng.gamma(2.0, 35.0, size=(h, w)) * np.clip(1.2 - yy / h, 0.2, 1.0)
    img = Image.fromarray(np.where(sector, np.clip(tissue, 0, 255), 0).astype(np.uint8))
    ImageDraw.Draw(img).text((2, 2), f"ID {seed}", fill=255)
    return np.asarray(img)


def image_folder(root: Path, per_class: int = 6, classes=("a", "b"), size=(120, 160)) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(fan(100 * c + i, *size)).save(root / name / f"p{c}{i}_img.png")
    return root


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="usjepa")
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["shards", *argv])
    return args.func(args)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def manifest_json(out: Path) -> dict:
    data = json.loads((out / "manifest.json").read_text())
    data.pop("created")
    return data


def samples(out: Path) -> list[tuple[str, np.ndarray, np.ndarray, dict]]:
    import webdataset as wds

    m = load_manifest(out)
    got = []
    for split in m.splits:
        urls = [str(p) for p in m.shard_paths(split)]
        for raw in wds.WebDataset(urls, shardshuffle=False) if urls else []:
            image, region, meta = decode_sample(raw)
            got.append((raw["__key__"], image, region, meta))
    return got


def results(out: Path) -> int:
    items = out / ".work" / "items"
    if not items.is_dir():
        return 0
    return sum(1 for sub in os.scandir(items) if sub.is_dir() for f in os.scandir(sub.path) if f.name.endswith(".res"))


# ----------------------------------------------------------------------------- resumability
def test_killed_build_resumes_to_the_same_bytes(tmp_path):
    """kill -9 of a real `usjepa shards build --workers 2` mid-way; the rerun (1 worker)
    reuses the finished items and ends byte-identical to an uninterrupted build."""
    src = image_folder(tmp_path / "src", per_class=70, size=(240, 320))
    flags = ["--size", "48", "--shard-size", "16", "--group-pattern", r"^(p\d+)_", "--no-progress"]
    assert cli("build", str(src), str(tmp_path / "whole"), *flags) == 0

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "usjepa", "shards", "build", str(src), str(out), *flags, "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while results(out) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = results(out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 10 <= done < 140 and not (out / "manifest.json").exists()
    # the orphaned workers notice their parent died and exit
    if Path("/proc").is_dir():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _processes_mentioning(str(out)):
            time.sleep(0.05)
        assert not _processes_mentioning(str(out))

    assert cli("build", str(src), str(out), *flags) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    run = report["run"]
    assert run["items_reused"] >= done and run["items_processed"] == 140 - run["items_reused"]
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole") and len(shard_bytes(out)) > 3
    assert manifest_json(out) == manifest_json(tmp_path / "whole")
    assert not (out / ".work").exists() and not list(out.glob(".*"))
    assert verify_shards(out)["ok"]


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes().decode(errors="replace")
                state = Path(entry.path, "stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            if text in cmdline and state != "Z":
                pids.append(int(entry.name))
    return pids


def test_workers_do_not_change_the_output(tmp_path):
    src = image_folder(tmp_path / "src", per_class=9)
    settings = BuildSettings(image_size=40, shard_size=4, group_pattern=r"^(p\d+)_")
    one = run_build(src, tmp_path / "one", settings, progress=False, workers=1)
    two = run_build(src, tmp_path / "two", settings, progress=False, workers=2)
    assert two.report["run"]["workers"] == 2 and one.manifest.total == 18
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert manifest_json(tmp_path / "one") == manifest_json(tmp_path / "two")


def test_interrupted_packing_resumes_without_reprocessing(tmp_path, monkeypatch):
    import usjepa.ingest.build.pack as writer

    src = image_folder(tmp_path / "src", per_class=6)
    settings = BuildSettings(image_size=32, shard_size=3, group_pattern=r"^(p\d+)_")
    build_shards(src, tmp_path / "whole", settings, progress=False)
    real, calls = writer.TarStream.write, []

    def failing(self, sample):
        calls.append(1)
        if len(calls) == 5:  # in the second shard of the first split
            raise KeyboardInterrupt
        real(self, sample)

    monkeypatch.setattr(writer.TarStream, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        build_shards(src, tmp_path / "out", settings, progress=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    # finished tars may stay (no manifest claims them; the rerun rewrites them), no temporary ones
    assert ".work" in names and "manifest.json" not in names and not [n for n in names if ".tmp-" in n]
    assert results(tmp_path / "out") == 12
    monkeypatch.setattr(writer.TarStream, "write", real)
    resumed = run_build(src, tmp_path / "out", settings, progress=False)
    assert resumed.report["run"]["items_processed"] == 0 and resumed.report["run"]["items_reused"] == 12
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "whole")
    assert manifest_json(tmp_path / "out") == manifest_json(tmp_path / "whole")


def test_changed_settings_are_refused_then_overwrite_starts_over(tmp_path, monkeypatch):
    import usjepa.ingest.build.item as work  # where the worker entry point looks process_item up

    src = image_folder(tmp_path / "src", per_class=4)
    out = tmp_path / "out"
    real, calls = work.process_item, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(work, "process_item", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_shards(src, out, BuildSettings(image_size=32), progress=False)
    monkeypatch.setattr(work, "process_item", real)
    assert results(out) == 3
    with pytest.raises(UserError, match=r"other settings \(preprocess.image_size: 32 -> 40.*--overwrite"):
        build_shards(src, out, BuildSettings(image_size=40), progress=False)
    # split settings do not change a per-item result: the work is reused
    m = run_build(src, out, BuildSettings(image_size=32, val_fraction=0.25, seed=3), progress=False, keep_work=True)
    assert m.report["run"]["items_reused"] == 3 and m.manifest.total == 8
    assert (out / ".work").is_dir() and verify_shards(out)["leftover_work"]
    # --overwrite with other preprocessing discards the old work
    m = run_build(src, out, BuildSettings(image_size=40, overwrite=True), progress=False)
    assert m.report["run"]["items_reused"] == 0 and m.manifest.image_size == 40 and not (out / ".work").exists()


# ----------------------------------------------------------------------------- colour
def _busi_or_synthetic() -> np.ndarray:
    files = sorted(BUSI.glob("benign/benign (1*).png")) if BUSI.is_dir() else []
    return load_image(files[0])[0] if files else fan(7, 200, 200)


def test_small_colour_overlay_is_inpainted_and_large_one_flagged(tmp_path):
    gray = _busi_or_synthetic()
    if gray.ndim == 3:
        gray = gray[..., 0]
    h, w = gray.shape
    clean = np.stack([gray] * 3, -1)
    small = Image.fromarray(clean.copy())
    ImageDraw.Draw(small).rectangle([w // 3, h // 3, w // 3 + w // 8, h // 3 + h // 8], outline=(255, 0, 0), width=2)
    large = Image.fromarray(clean.copy())
    ImageDraw.Draw(large).rectangle([w // 4, h // 4, w // 4 + w // 3, h // 4 + h // 3], fill=(200, 30, 30))
    src = tmp_path / "src" / "scan"
    src.mkdir(parents=True)
    Image.fromarray(clean).save(src / "clean.png")  # gray stored as RGB: collapses to gray at load
    small.save(src / "small_box.png")
    large.save(src / "large_box.png")
    assert load_image(src / "clean.png")[0].ndim == 2 and load_image(src / "small_box.png")[0].ndim == 3

    result = run_build(
        src.parent, tmp_path / "out", BuildSettings(image_size=64, val_fraction=0, test_fraction=0), progress=False
    )
    got = {meta["source"].split("/")[-1]: (image, meta) for _, image, _, meta in samples(tmp_path / "out")}
    assert set(got) == {"clean.png", "small_box.png", "large_box.png"}
    c, s, big = got["clean.png"][1], got["small_box.png"][1], got["large_box.png"][1]
    assert (c["color_fraction"], c["inpainted"], c["overlay_flagged"]) == (0.0, False, False)
    assert 0 < s["color_fraction"] < 0.05 and s["inpainted"] and not s["overlay_flagged"]
    assert big["color_fraction"] >= 0.05 and big["overlay_flagged"] and not big["inpainted"]
    # the inpainted box is close to the clean image; plain luma of the red box is not
    diff = np.abs(got["small_box.png"][0].astype(int) - got["clean.png"][0].astype(int))
    assert diff.mean() < 2.0 and diff.max() < 255
    summary = result.manifest.build_summary
    assert (summary["overlay_inpainted"], summary["overlay_flagged"], summary["overlay_skipped"]) == (1, 1, 0)
    assert [f["source"] for f in result.report["overlay_flagged"]] == ["scan/large_box.png"]
    assert verify_shards(tmp_path / "out")["overlay_flagged"] == 1

    skipped = run_build(
        src.parent, tmp_path / "skip", BuildSettings(image_size=64, large_overlay="skip"), progress=False
    )
    assert skipped.manifest.total == 2 and skipped.manifest.build_summary["overlay_skipped"] == 1
    first = skipped.report["skipped"][0]
    assert first["stage"] == "overlay" and "large_overlay=skip" in first["reason"]


def test_overlay_inpainting_fills_from_the_surroundings():
    rng = np.random.default_rng(0)
    gray = np.tile(np.linspace(40, 200, 64).astype(np.uint8), (64, 1))  # a smooth ramp
    rgb = np.stack([gray] * 3, -1) + rng.integers(0, 3, (64, 64, 3), dtype=np.uint8)  # chroma noise < tolerance
    rgb[20:24, 10:50] = (255, 255, 0)  # a yellow caliper line
    mask = colour_mask(rgb, 16)
    assert mask[20:24, 10:50].all() and mask.sum() == 4 * 40
    out, info = to_gray(rgb, OverlaySettings())
    assert info["inpainted"] and abs(info["color_fraction"] - 160 / 4096) < 1e-3
    assert np.abs(out[18:26, 8:52].astype(int) - gray[18:26, 8:52]).max() <= 4  # the ramp continues under the line
    flagged, info = to_gray(rgb, OverlaySettings(max_fraction=0.01))
    assert info["overlay_flagged"] and not info["inpainted"] and flagged[21, 30] > 200  # luma, untouched


# ----------------------------------------------------------------------------- selection
def test_duplicates_are_written_once_and_listed(tmp_path):
    src = image_folder(tmp_path / "src", per_class=3)
    (src / "b" / "copy_of_a0.png").write_bytes((src / "a" / "p00_img.png").read_bytes())
    Image.open(src / "a" / "p01_img.png").convert("RGB").save(src / "b" / "rgb_copy_of_a1.png")
    result = run_build(src, tmp_path / "out", BuildSettings(image_size=32), progress=False)
    assert result.manifest.total == 6 and result.manifest.build_summary["duplicates"] == 2
    pairs = {(d["source"], d["duplicate_of"]) for d in result.report["duplicates"]}
    assert {frozenset(p) for p in pairs} == {
        frozenset({"a/p00_img.png", "b/copy_of_a0.png"}),
        frozenset({"a/p01_img.png", "b/rgb_copy_of_a1.png"}),
    }
    hashes = [meta["pixel_hash"] for *_, meta in samples(tmp_path / "out")]
    assert len(set(hashes)) == len(hashes) == 6
    assert verify_shards(tmp_path / "out")["duplicates_at_build"] == 2
    kept = run_build(src, tmp_path / "all", BuildSettings(image_size=32, dedup=False), progress=False)
    assert kept.manifest.total == 8


def test_max_samples_caps_deterministically_and_weights(tmp_path):
    src = image_folder(tmp_path / "src", per_class=10)
    settings = BuildSettings(image_size=32, max_samples=7, weight_cap=4)
    a = run_build(src, tmp_path / "a", settings, progress=False)
    for attempt in range(3):  # the workers run ahead of the cap by different amounts each time
        run_build(src, tmp_path / f"b{attempt}", settings, progress=False, workers=2)
        assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / f"b{attempt}")
        assert manifest_json(tmp_path / "a") == manifest_json(tmp_path / f"b{attempt}")
    summary = a.report["summary"]
    assert a.manifest.total == 7 and (summary["items_read"], summary["items_not_read"], summary["capped"]) == (7, 13, 0)
    assert a.manifest.sampling_weight == min(a.manifest.count("train"), 4) and a.manifest.weight_cap == 4
    run_build(src, tmp_path / "c", BuildSettings(image_size=32, max_samples=7, seed=5), progress=False)
    keys_a, keys_c = (sorted(k for k, *_ in samples(tmp_path / d)) for d in ("a", "c"))
    assert keys_c != keys_a and len(keys_c) == 7
    full = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert full["sampling_weight"] == a.manifest.sampling_weight and full["selection"]["max_samples"] == 7
    assert verify_shards(tmp_path / "a")["ok"]


def test_build_report_lists_corrupt_inputs(tmp_path, capsys):
    src = image_folder(tmp_path / "src", per_class=3)
    good = (src / "a" / "p00_img.png").read_bytes()
    (src / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "b" / "really_text.png").write_text("this is a text file, not a PNG\n")
    (src / "b" / "empty.jpg").write_bytes(b"")
    assert cli("build", str(src), str(tmp_path / "out"), "--size", "32", "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "skipped 3" in printed and "really_text.png" in printed
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    reasons = {s["source"]: s for s in report["skipped"]}
    assert set(reasons) == {"a/truncated.png", "b/really_text.png", "b/empty.jpg"}
    assert all(s["stage"] == "read" and s["reason"].startswith("unreadable:") for s in reasons.values())
    assert "UnidentifiedImageError" in reasons["b/really_text.png"]["reason"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_skipped"] == 3 and manifest["build_summary"]["skipped_by_stage"] == {"read": 3}
    assert load_manifest(tmp_path / "out").total == 6


# ----------------------------------------------------------------------------- frames, splits, labels
@dataclass(frozen=True)
class _CineItem(SourceItem):
    n_frames: int = 1
    broken_after: int | None = None

    def load(self) -> Loaded:
        return next(iter(self.frames()))

    def frames(self):
        for f in range(self.n_frames):
            if self.broken_after is not None and f >= self.broken_after:
                raise OSError("truncated stream")
            # a stable, per-item seed (str hash() changes per process): frames never repeat across items
            rgb = np.stack([fan(zlib.crc32(self.key.encode()) % 1000 * 10 + f)] * 3, -1)
            yield Loaded(rgb, None, {"frame": f, "time_s": f / 10})


class _CineSource(Source):
    looks_for = "*.cine marker files"

    @dataclass(frozen=True)
    class Options:
        fps: int = 10

    def scan(self):
        items = [
            _CineItem(
                key=make_key(f"v{v}"),
                source=f"v{v}.mp4",
                label=0 if v < 4 else -1,
                class_name="lung" if v < 4 else "",
                group=f"patient{v // 2}",
                split="test" if v in (0, 1) else None,
                n_frames=3,
                broken_after=2 if v == 5 else None,
            )
            for v in range(8)
        ]
        return items, {}, ["lung"]

    @classmethod
    def looks_like(cls, root):
        return any(Path(root).glob("*.cine"))


def test_frames_prescribed_splits_and_unlabelled(tmp_path, monkeypatch):
    monkeypatch.setitem(sources_module.SOURCES, "cine", _CineSource)
    _CineSource.format_name = "cine"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.cine").write_text("")
    assert detect_format(tmp_path / "src") == "cine"
    result = run_build(
        tmp_path / "src",
        tmp_path / "out",
        BuildSettings(image_size=32, val_fraction=0.2, test_fraction=0.2, source_options={"fps": 5}),
        progress=False,
    )
    got = samples(tmp_path / "out")
    keys = {k for k, *_ in got}
    assert f"{make_key('v3')}_f00002" in keys and make_key("v3") not in keys
    assert len(got) == 8 * 3 - 1  # v5 breaks after 2 frames: those 2 are kept, the failure listed
    failed = result.report["skipped"]
    assert [(f["source"], f["stage"]) for f in failed] == [("v5.mp4", "read")]
    assert "after 2 frame(s)" in failed[0]["reason"]
    split_of_video = {}
    for _, _, _, meta in got:
        split_of_video.setdefault(meta["source"], set()).add(meta["split"])
        assert meta["frame"] in (0, 1, 2) and meta["time_s"] == meta["frame"] / 10
    assert split_of_video["v0.mp4"] == split_of_video["v1.mp4"] == {"test"}  # prescribed
    assert all(len(s) == 1 for s in split_of_video.values())  # frames of a video stay together
    m = result.manifest
    assert sum(info.unlabelled for info in m.splits.values()) == 4 * 3 - 1
    assert m.split_settings["prescribed_samples"] == 6 and m.split_settings["group_disjoint"]
    assert m.source_stats["options"]["fps"] == 5
    assert verify_shards(tmp_path / "out")["ok"]
    with pytest.raises(UserError, match=r"source format 'cine': unknown key 'options.fsp'; did you mean 'options.fps'"):
        build_shards(tmp_path / "src", tmp_path / "o2", BuildSettings(source_options={"fsp": 5}), progress=False)
    with pytest.raises(UserError, match="--group-pattern does not apply to source format 'cine'"):
        build_shards(tmp_path / "src", tmp_path / "o2", BuildSettings(group_pattern="(x)"), progress=False)


# ----------------------------------------------------------------------------- formats, CLI, inspect
def test_format_auto_picks_imagefolder_and_fails_clearly(tmp_path, capsys):
    src = image_folder(tmp_path / "src", per_class=2)
    assert detect_format(src) == "imagefolder"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    with pytest.raises(UserError) as err:
        detect_format(tmp_path / "empty")
    message = str(err.value)
    assert "could not recognise the format" in message and "formats tried" in message
    assert "imagefolder: images" in message and "<class name>" in message and "notes.txt" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="does not exist"):
        detect_format(tmp_path / "nope")
    from usjepa.cli import main

    assert main(["shards", "build", str(tmp_path / "empty"), str(tmp_path / "o"), "--no-progress"]) == 2
    assert "could not recognise the format" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert (
        cli(
            "build",
            str(src),
            str(tmp_path / "o"),
            "--format",
            "auto",
            "--size",
            "32",
            "--no-progress",
            "--source-option",
            r"group_pattern=^(p\d+)_",
        )
        == 0
    )
    assert "format imagefolder (detected)" in capsys.readouterr().out
    assert load_manifest(tmp_path / "o").grouping["mode"] == "pattern"


def test_inspect_writes_a_contact_sheet(tmp_path, capsys):
    src = image_folder(tmp_path / "src", per_class=5)
    build_shards(src, tmp_path / "out", BuildSettings(image_size=32, val_fraction=0, test_fraction=0), progress=False)
    sheet = tmp_path / "sheet.png"
    assert cli("inspect", str(tmp_path / "out"), "--grid", str(sheet), "--n", "6", "--split", "train") == 0
    assert "contact sheet: 6 train samples" in capsys.readouterr().out
    with Image.open(sheet) as img:
        img.load()
        assert img.mode == "RGB" and img.width >= 3 * 128 and img.height >= 2 * 128
        pixels = np.asarray(img)
    assert (np.abs(pixels.astype(int) - (40, 220, 90)).sum(-1) == 0).sum() > 100  # region borders drawn
    drawn = contact_sheet(tmp_path / "out", tmp_path / "all.png", n=100)
    assert drawn["samples"] == 10
    with pytest.raises(UserError, match="holds no samples"):
        contact_sheet(tmp_path / "out", tmp_path / "val.png", split="val")


def test_recipe_flag_with_overrides(tmp_path, capsys):
    pytest.importorskip("usjepa.ingest.recipes")
    src = image_folder(tmp_path / "data" / "set", per_class=3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "format: imagefolder\nsource: ${DATA}/set\noptions: {group_pattern: '^(p\\d+)_'}\n"
        "build: {image_size: 48, val_fraction: 0.0, test_fraction: 0.0}\n"
    )
    assert src.is_dir()
    from usjepa.cli import main

    assert (
        main(
            [
                "shards",
                "build",
                "--recipe",
                str(recipe),
                str(tmp_path / "out"),
                "--set",
                f"DATA={tmp_path / 'data'}",
                "--size",
                "32",
                "--no-progress",
            ]
        )
        == 0
    )
    m = load_manifest(tmp_path / "out")
    assert m.image_size == 32 and m.count("train") == 6 and m.grouping["mode"] == "pattern"
    assert main(["shards", "build", str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "no source given" in capsys.readouterr().err


# ----------------------------------------------------------------------------- source options
def test_source_options_are_typed_and_checked_through_the_cli(tmp_path, capsys):
    from usjepa.cli import main

    src = image_folder(tmp_path / "src", per_class=2)
    out = str(tmp_path / "out")
    assert main(["shards", "build", str(src), out, "--source-option", "group_patern=^(p\\d+)_", "--no-progress"]) == 2
    assert (
        "source format 'imagefolder': unknown key 'options.group_patern'; did you mean 'options.group_pattern'?"
        in capsys.readouterr().err
    )
    assert (
        main(["shards", "build", str(src), out, "--format", "video", "--source-option", "fps=fast", "--no-progress"])
        == 2
    )
    assert "source format 'video': options.fps: expected float, got 'fast'" in capsys.readouterr().err
    assert (
        main(
            [
                "shards",
                "build",
                str(src),
                out,
                "--format",
                "dicom",
                "--source-option",
                "group_by=hospital",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "options.group_by: 'hospital' is not one of patient, study, series, file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["shards", "build", "--help"])
    assert "video: fps=3.0, max_frames=30" in " ".join(capsys.readouterr().out.split())


def test_source_options_are_typed_and_checked_in_a_recipe(tmp_path):
    from usjepa.ingest.recipes import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("format: video\nsource: /x\noptions: {fsp: 3}\n")
    with pytest.raises(
        UserError,
        match=r"recipe .*r.yaml: source format 'video': unknown key 'options.fsp'; did you "
        r"mean 'options.fps'\?",
    ):
        load_recipe(recipe, {}, environ={})
    recipe.write_text("format: video\nsource: /x\nbuild: {max_frames: many}\n")
    with pytest.raises(UserError, match=r"options.max_frames: expected int, got 'many'"):
        load_recipe(recipe, {}, environ={})
    recipe.write_text("format: csv\nsource: /x.csv\noptions: {label_column: [a, b]}\n")
    with pytest.raises(UserError, match=r"options.label_column: expected str"):
        load_recipe(recipe, {}, environ={})
    recipe.write_text("format: video\nsource: /x\noptions: {fps: 2, region: {work_size: 64}}\n")
    _, settings, options = load_recipe(recipe, {}, environ={})
    assert options == {"fps": 2, "region": {"work_size": 64}} and settings.source_options == options


# ----------------------------------------------------------------------------- one-line errors
def _one_line_error(capsys, argv: list[str]) -> str:
    """Run `usjepa ARGV` in this process; it must fail with exit status 2 and one line on stderr."""
    from usjepa.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("usjepa shards: error: "), err
    return err


def test_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    src = image_folder(tmp_path / "src", per_class=2)
    (tmp_path / "somefile").write_text("x")
    err = _one_line_error(capsys, ["shards", "build", str(src), str(tmp_path / "somefile" / "out"), "--no-progress"])
    assert "cannot create the output folder" in err and "somefile is a file, not a folder" in err
    if Path("/proc/self").is_dir():  # not writable even for root
        err = _one_line_error(capsys, ["shards", "build", str(src), "/proc/usjepa-not-writable/out", "--no-progress"])
        assert "cannot create the output folder /proc/usjepa-not-writable/out" in err
    if os.geteuid() != 0:  # root writes into a 0o500 folder all the same
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        err = _one_line_error(capsys, ["shards", "build", str(src), str(locked), "--no-progress"])
        assert f"output folder {locked} is not writable" in err


def test_output_inside_the_source_or_among_other_files_is_refused(tmp_path, capsys):
    src = image_folder(tmp_path / "src", per_class=2)
    for out in (src, src / "shards"):
        err = _one_line_error(capsys, ["shards", "build", str(src), str(out), "--no-progress"])
        assert err == (
            f"usjepa shards: error: OUT {out} is inside the source folder {src}: the shards would be mixed into "
            "the data; choose a folder outside SRC\n"
        )
    assert not (src / "shards").exists() and not (src / ".work").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    err = _one_line_error(capsys, ["shards", "build", str(src), str(mine), "--no-progress", "--overwrite"])
    assert err == (
        f"usjepa shards: error: OUT {mine} holds files that no shard build wrote (first: notes.txt); choose a "
        "new or empty folder, or a folder of an earlier build\n"
    )
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_contact_sheet_under_a_file_is_one_line(tmp_path, capsys):
    src = image_folder(tmp_path / "src", per_class=2)
    build_shards(src, tmp_path / "out", BuildSettings(image_size=32, val_fraction=0, test_fraction=0), progress=False)
    (tmp_path / "somefile").write_text("x")
    grid = str(tmp_path / "somefile" / "sheet.png")
    err = _one_line_error(capsys, ["shards", "inspect", str(tmp_path / "out"), "--grid", grid])
    assert "for the contact sheet is a file, not a folder" in err


def test_contact_sheet_of_a_damaged_set_is_one_line(tmp_path, capsys):
    src = image_folder(tmp_path / "src", per_class=2)
    out = tmp_path / "out"
    build_shards(src, out, BuildSettings(image_size=32, val_fraction=0, test_fraction=0), progress=False)
    tar = out / "train-000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:700])  # cut inside the first sample's members
    argv = ["shards", "inspect", str(out), "--grid", str(tmp_path / "sheet.png")]
    err = _one_line_error(capsys, argv).rstrip("\n")
    assert err.startswith(f"usjepa shards: error: shard {tar} cannot be read (")
    assert err.endswith(f"`usjepa shards verify {out}` lists what is damaged: rebuild or restore the set")
    tar.unlink()
    assert "No such file or directory" in _one_line_error(capsys, argv)
    assert not (tmp_path / "sheet.png").exists()


def test_file_size_limit_is_one_line_and_the_build_resumes(tmp_path):
    """A real build under RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail with EFBIG) ends with one line
    naming the file; rerun without the limit, it finishes with the shards of an unlimited build."""
    src = image_folder(tmp_path / "src", per_class=6)
    flags = ["--size", "48", "--shard-size", "100", "--no-progress"]
    assert cli("build", str(src), str(tmp_path / "whole"), *flags) == 0
    limited = (
        "import resource, signal, sys\n"
        "from usjepa.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))\n"
        "sys.exit(main(sys.argv[2:]))\n"
    )
    out = tmp_path / "out"
    for limit, workers, written in ((1500, "2", ".res"), (20000, "1", "train-000000.tar")):
        argv = ["shards", "build", str(src), str(out), *flags, "--workers", workers]
        proc = subprocess.run(
            [sys.executable, "-c", limited, str(limit), *argv],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
        assert proc.stderr.startswith("usjepa shards: error: cannot write ") and "File too large" in proc.stderr
        assert (
            written in proc.stderr and "raise the file-size limit" in proc.stderr and "free disk space" in proc.stderr
        )
        assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp-*"))
    assert cli("build", str(src), str(out), *flags) == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")


def test_options_and_positionals_mix_in_any_order(tmp_path):
    from usjepa.cli import main

    src = image_folder(tmp_path / "src", per_class=2)
    out = tmp_path / "out"
    assert (
        main(["shards", "build", str(src), "--format", "imagefolder", str(out), "--size", "32", "--no-progress"]) == 0
    )
    assert load_manifest(out).image_size == 32 and load_manifest(out).source_format == "imagefolder"
    assert main(["shards", "build", "--size", "40", str(src), "--no-progress", str(tmp_path / "o2")]) == 0
    assert load_manifest(tmp_path / "o2").image_size == 40
    assert main(["shards", "inspect", "--n", "2", str(out), "--grid", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
