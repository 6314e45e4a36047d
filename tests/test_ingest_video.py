"""Video source (usjepa.ingest.sources.video): sampling by time, near-duplicates, the motion region,
grouping, corrupt files, listing. Synthetic videos are written here with PyAV and Pillow;
real ones are COVID-BLUES lung-ultrasound loops from ../shared/data (skipped when absent)."""

from __future__ import annotations

import itertools
import pickle
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw

from usjepa.errors import UserError
from usjepa.ingest.image.region import detect_region
from usjepa.ingest.sources import SOURCES, open_source
from usjepa.ingest.sources.video import VideoSource
from usjepa.ingest.sources.video_frames import VideoSettings, benchmark, read_video

COVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-blues" / "lus_videos"
needs_covid = pytest.mark.skipif(not COVID.is_dir(), reason=f"COVID-BLUES videos not found at {COVID}")

H, W, N, RATE = 128, 160, 40, 10  # synthetic: 40 frames at 10 fps = 4 s
TEXT_BOX = (4, 2, 70, 14)  # (x0, y0, x1, y1) of the static text in the top-left corner
LOGO_BOX = (4, 100, 20, 124)  # a static bright block bottom-left


def fan_mask() -> np.ndarray:
    """A phased-array sector: apex at the top centre, radius 108 px, +-35 degrees."""
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    dy, dx = yy - 4, xx - W / 2
    return (np.hypot(dy, dx) <= 108) & (np.abs(np.degrees(np.arctan2(dx, dy))) <= 35)


def speckle_frames(n: int = N, seed: int = 0, colour: bool = False) -> list[np.ndarray]:
    """Moving speckle inside the fan (scrolls 4 px per frame), black surround, static text
    and a static block outside the fan. colour: a moving red/blue 'Doppler' patch too."""
    rng = np.random.default_rng(seed)
    fan = fan_mask()
    base = rng.uniform(50, 230, size=(H + 4 * n, W // 2)).repeat(2, axis=1)
    frames = []
    for i in range(n):
        img = np.zeros((H, W), np.uint8)
        speckle = base[4 * i : 4 * i + H] * rng.uniform(0.85, 1.15, size=(H, W))
        img[fan] = np.clip(speckle, 0, 255)[fan].astype(np.uint8)
        pil = Image.fromarray(img).convert("RGB")
        draw = ImageDraw.Draw(pil)
        draw.text(TEXT_BOX[:2], "LUS 3.5MHz", fill=(255, 255, 255))
        draw.text((W - 44, H - 26), "12:04", fill=(230, 230, 230))
        draw.rectangle(LOGO_BOX, fill=(200, 200, 200))
        if colour:
            x = 60 + (i % 10)
            draw.rectangle([x, 50, x + 24, 74], fill=(220, 30, 30))
            draw.rectangle([x, 62, x + 24, 74], fill=(30, 60, 220))
        frames.append(np.asarray(pil))
    return frames


def write_video(path: Path, frames: list[np.ndarray], codec: str, rate: int = RATE, **stream_attrs) -> Path:
    options = stream_attrs.pop("options", {})
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for name, value in stream_attrs.items():
            setattr(stream, name, value)
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_gif(path: Path, frames: list[np.ndarray], duration) -> Path:
    images = [Image.fromarray(f).convert("L") for f in frames]  # grey GIF: no palette quantisation
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    frames = speckle_frames()
    repeated = frames[:10] + [frames[10]] * 10 + frames[20:]  # frames 10-19 identical
    return {
        "mp4": write_video(d / "fan.mp4", frames, "libx264"),
        "avi": write_video(d / "fan.avi", frames, "mpeg4", bit_rate=2_000_000),
        "gif": write_gif(d / "fan.gif", frames, duration=100),
        "mov": write_video(d / "fan.mov", frames, "libx264"),
        "mpg": write_video(d / "fan.mpg", frames, "mpeg2video", bit_rate=4_000_000),  # MPEG-PS: pts start ~0.5 s
        "repeat": write_video(d / "repeat.mp4", repeated, "libx264"),
        "still": write_video(d / "still.mp4", [frames[0]] * 20, "libx264"),
        "colour": write_video(d / "colour.mp4", speckle_frames(colour=True), "libx264"),
        "faststart": write_video(d / "faststart.mp4", frames, "libx264", options={"movflags": "faststart"}),
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ---------------------------------------------------------------------------- sampling
def test_fps_sampling_by_time(videos):
    out = read_video(videos["mp4"])  # defaults: 3 fps, at most 30
    times = [f.info["time"] for f in out]
    assert len(out) == 12  # ceil(4 s x 3 fps)
    assert times[0] == 0.0 and all(b > a for a, b in itertools.pairwise(times))
    assert np.allclose(np.diff(times), 1 / 3, atol=0.1)  # grid 1/3 s, frames every 0.1 s
    assert [f.info["frame"] for f in out] == [round(t * RATE) for t in times]
    info = out[0].info
    assert info["source_fps"] == 10 and info["sample_fps"] == 3 and info["video_size"] == [W, H]
    assert info["frames_decoded"] == N and info["frames_kept"] == 12 and info["frames_duplicate"] == 0
    assert out[0].image.shape == (H, W) and out[0].image.dtype == np.uint8
    assert len(read_video(videos["mp4"], VideoSettings(fps=0, max_frames=0, dedup_threshold=0))) == N  # every frame


def test_max_frames_caps_and_spreads(videos):
    out = read_video(videos["mp4"], VideoSettings(fps=3, max_frames=5))
    times = [f.info["time"] for f in out]
    assert len(out) == 5
    assert times[-1] >= 3.0  # spread over the 4 s loop (rate lowered to 5 / 4 s), not the first 1.7 s
    assert out[0].info["sample_fps"] == 1.25


def test_gif_variable_frame_rate_is_sampled_by_time(tmp_path):
    # 20 frames of 0.1 s, then 4 of 0.5 s: 4 s in all; by time at 2 fps the grid points
    # 0, 0.5, ..., 3.5 s fall on frames 0, 5, 10, 15, 20, 21, 22, 23 (by index it would be 0, 12)
    gif = write_gif(tmp_path / "vfr.gif", speckle_frames(24), duration=[100] * 20 + [500] * 4)
    out = read_video(gif, VideoSettings(fps=2, dedup_threshold=0))
    assert [f.info["frame"] for f in out] == [0, 5, 10, 15, 20, 21, 22, 23]
    assert [f.info["time"] for f in out] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert out[0].info["codec"] == "gif" and out[0].image.ndim == 2


def test_near_duplicates_are_skipped(videos):
    every = VideoSettings(fps=0, max_frames=0)
    out = read_video(videos["repeat"], every)
    kept = [f.info["frame"] for f in out]
    assert len(out) == N - 9 and out[0].info["frames_duplicate"] == 9
    assert 10 in kept and not set(range(11, 20)) & set(kept)  # the first of the repeats stays
    assert len(read_video(videos["repeat"], VideoSettings(fps=0, max_frames=0, dedup_threshold=0))) == N  # 0: off
    # at 3 fps the frozen second gives one frame instead of three
    at3 = read_video(videos["repeat"])
    assert len(at3) < len(read_video(videos["mp4"])) and at3[0].info["frames_duplicate"] >= 2
    # a still loop: one frame kept, region from the mean frame (nothing varies)
    still = read_video(videos["still"])
    assert len(still) == 1 and still[0].info["frames_duplicate"] > 0
    assert still[0].info["region_method"] == "mean_frame" and "still" in still[0].info["region_note"]


# ---------------------------------------------------------------------------- region
@pytest.mark.parametrize("kind", ["mp4", "avi", "gif", "mov", "mpg"])
def test_motion_region_is_the_fan(videos, kind):
    out = read_video(videos[kind])
    fan = fan_mask()
    region = out[0].region
    assert out[0].info["region_method"] == "motion" and len(out) == 12 and out[0].info["time"] == 0.0
    assert iou(region, fan) > 0.9
    x0, y0, x1, y1 = TEXT_BOX
    assert not region[y0:y1, x0:x1].any(), "static text counted as scan"
    x0, y0, x1, y1 = LOGO_BOX
    assert not region[y0 : y1 + 1, x0 : x1 + 1].any(), "static block counted as scan"
    assert not region[H - 8 :, :].any() and not region[:, :8].any() and not region[:, -8:].any()  # black border
    assert all(np.array_equal(f.region, region) for f in out)  # one region per video


def test_motion_region_beats_intensity_on_touching_overlay(tmp_path):
    # a static grey bar touching the bottom of the fan: intensity detection takes it in,
    # the motion region does not
    frames = []
    for rgb in speckle_frames(30):
        rgb = rgb.copy()
        rgb[100:H, 40:120] = 120
        frames.append(rgb)
    out = read_video(write_video(tmp_path / "bar.mp4", frames, "libx264"))
    fan = fan_mask() & ~np.pad(np.ones((H - 100, 80), bool), ((100, 0), (40, W - 120)))
    assert not out[0].region[104:, 44:116].any()
    mean = np.rint(np.mean([f.image for f in out], axis=0)).astype(np.uint8)
    assert detect_region(mean)[104:, 44:116].all()  # what the fallback would have done
    assert iou(out[0].region, fan) > 0.88


def test_colour_video_returns_rgb(videos):
    out = read_video(videos["colour"])
    assert all(f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 for f in out)
    assert out[0].info["orig_mode"] == "RGB" and max(f.info["color_fraction"] for f in out) > 0.01
    assert read_video(videos["mp4"])[0].info["orig_mode"] == "L"


# ---------------------------------------------------------------------------- corrupt files
def test_truncated_faststart_mp4_raises(videos, tmp_path):
    data = videos["faststart"].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # header intact, half the frames missing
    with pytest.raises(ValueError, match=r"cut.mp4.*truncated"):  # header says 40 frames, 16 decode
        read_video(cut)


# ---------------------------------------------------------------------------- the source
@pytest.fixture
def class_tree(videos, tmp_path) -> Path:
    root = tmp_path / "tree"
    for cls, names in {"a_lines": ["mp4", "gif"], "b_lines": ["avi", "repeat"]}.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            shutil.copyfile(videos[name], root / cls / f"{cls}_{name}{videos[name].suffix}")
    (root / "a_lines" / "notes.txt").write_text("not a video")
    (root / ".hidden").mkdir()
    shutil.copyfile(videos["mp4"], root / ".hidden" / "skip.mp4")
    return root


def test_class_folders(class_tree):
    source = open_source("video", class_tree, labels="folders", fps=2)
    items = list(source)
    assert source.classes == ["a_lines", "b_lines"] and source.label_mode == "folders"
    assert {(it.class_name, it.label) for it in items} == {("a_lines", 0), ("b_lines", 1)}
    assert [it.group for it in items] == [it.source for it in items]  # no pattern: the video is the group
    assert source.grouping()["mode"] == "per_video"
    stats = source.stats()
    assert stats["videos_found"] == 4 and stats["non_video_files"] == 1
    assert stats["extensions"] == {".avi": 1, ".gif": 1, ".mp4": 2}
    assert stats["sampling"]["fps"] == 2
    item = pickle.loads(pickle.dumps(items[0]))  # workers get items by pickle
    frames = list(item.frames())
    assert len(frames) == 8 and all(f.info["frame"] >= 0 for f in frames)
    assert VideoSource.looks_like(class_tree)
    assert open_source("video", class_tree).label_mode == "folders"  # auto: only folders, two videos each
    for i, cls in enumerate(("a_lines", "b_lines")):  # folders named like patients are not classes
        (class_tree / cls).rename(class_tree / f"patient_{i + 1}")
    assert open_source("video", class_tree).label_mode == "none"


def test_build_hands_its_region_settings_to_the_video_source(class_tree, tmp_path, monkeypatch):
    import functools

    from usjepa.ingest.build.run import build_shards
    from usjepa.ingest.image.region import RegionSettings
    from usjepa.ingest.settings import BuildSettings

    real, seen = VideoSource.__init__, []

    @functools.wraps(real)
    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("region"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(VideoSource, "__init__", recording)
    region = RegionSettings(threshold=3.0)
    build_shards(
        class_tree,
        tmp_path / "out",
        BuildSettings(format="video", image_size=16, region=region, max_samples=2, source_options={"fps": 1}),
        progress=False,
    )
    assert seen == [region]


def test_labels_none_and_user_errors(class_tree, tmp_path):
    source = VideoSource(class_tree, labels="none")
    assert source.classes == [] and {(it.label, it.class_name) for it in source} == {(-1, "")}
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no videos"):
        VideoSource(empty)
    with pytest.raises(UserError, match="does not exist"):
        VideoSource(tmp_path / "missing")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copyfile(class_tree / "a_lines" / "a_lines_mp4.mp4", flat / "x.mp4")
    with pytest.raises(UserError, match="labels='none'"):
        VideoSource(flat, labels="folders")
    with pytest.raises(UserError, match="fps"):
        VideoSource(flat, fps=-1)
    with pytest.raises(UserError, match="labels"):
        VideoSource(flat, labels="classes")
    with pytest.raises(UserError, match="region"):
        VideoSource(flat, region={"no_such_field": 1})
    assert VideoSource(flat, region={"work_size": 64}).settings.region.work_size == 64
    with pytest.raises(UserError, match="capture group"):
        VideoSource(flat, group_pattern=r"x")
    with pytest.raises(UserError, match="does not match"):
        VideoSource(flat, group_pattern=r"^patient_(\d+)")
    assert not VideoSource.looks_like(empty)


def test_looks_like_rejects_images(tmp_path):
    for i in range(3):
        Image.new("L", (8, 8), i).save(tmp_path / f"{i}.png")
        Image.new("L", (8, 8), i).save(tmp_path / f"{i}.gif")  # still GIFs: images, not videos
    assert not VideoSource.looks_like(tmp_path)
    assert "video" in SOURCES


# ---------------------------------------------------------------------------- real videos
@needs_covid
def test_covid_blues_videos(tmp_path):
    root = tmp_path / "lus"
    root.mkdir()
    for name in ["patient_10_L1", "patient_10_L2", "patient_26_L1"]:  # 26_L1 starts with 2 black frames
        shutil.copyfile(COVID / f"{name}.mp4", root / f"{name}.mp4")
    data = (COVID / "patient_27_L1.mp4").read_bytes()
    (root / "patient_27_L1.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: lost
    (root / "severity.csv").write_text("video,score\n")
    assert VideoSource.looks_like(root)

    source = VideoSource(root, group_pattern=r"^patient_(\d+)_")
    items = {it.source: it for it in source}
    assert source.label_mode == "none" and source.stats()["non_video_files"] == 1
    assert {it.group for it in items.values()} == {"10", "26", "27"}
    assert items["patient_10_L1.mp4"].group == items["patient_10_L2.mp4"].group == "10"
    assert source.grouping()["mode"] == "pattern" and source.grouping()["pattern"] == r"^patient_(\d+)_"
    assert {it.group for it in VideoSource(root)} == set(items)  # no pattern: the video is the group

    with pytest.raises(ValueError, match="cannot open video patient_27_L1.mp4"):
        list(items["patient_27_L1.mp4"].frames())
    for name in ["patient_10_L1.mp4", "patient_26_L1.mp4"]:  # unaffected by the broken one
        frames = list(items[name].frames())
        info = frames[0].info
        assert 6 <= len(frames) <= 13 and info["source_fps"] == 25 and info["region_method"] == "motion"
        assert frames[0].image.shape == (350, 350) and frames[0].image.dtype == np.uint8
        assert 0.3 < frames[0].region.mean() < 0.98
        mean = np.rint(np.mean([f.image for f in frames], axis=0)).astype(np.uint8)
        assert iou(frames[0].region, detect_region(mean)) > 0.85
    blank_start = list(items["patient_26_L1.mp4"].frames())
    assert blank_start[0].info["frames_blank"] == 2 and blank_start[0].info["frame"] == 2
    assert blank_start[0].image.max() > 50

    result = benchmark([root / "patient_10_L1.mp4", root / "patient_27_L1.mp4"])
    assert result["videos"] == 1 and len(result["failed"]) == 1 and result["frames_decoded"] == 100
    assert result["decoded_per_s"] > 0 and result["kept_per_s"] > 0
