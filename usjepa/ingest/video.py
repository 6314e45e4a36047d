"""Video source: a folder tree of cine loops (MP4, M4V, MOV, AVI, MPEG/MPG, MKV, WebM, animated GIF).

Each video is one item; `frames()` decodes it once, sequentially (PyAV, frame threading),
and yields the frames the sampling keeps:

* Rate: frames are sampled by presentation time (`frame.time`, i.e. pts x time base, or the
  index over the nominal rate when a frame has no pts), not by index, so variable-frame-rate
  files and GIFs with per-frame delays sample evenly. A frame is kept when its time reaches
  the next point of a grid `t0 + k / rate` (t0: the first non-blank frame); `rate` is `fps`,
  lowered to `max_frames / duration` when the container states a duration and the video is
  longer than `max_frames / fps`, so the kept frames span the whole loop; at most
  `max_frames` are kept in any case. `fps` 0 keeps every frame, `max_frames` 0 is no cap.
  `info["frame"]` is the decoded-frame index (blank frames count), `info["time"]` seconds
  since the first decoded frame.
* Blank frames (every pixel of a 32x32 thumbnail at most `blank_level`, e.g. the black
  frames some scanners write before the loop) are never kept and do not count as motion.
* Near-duplicates: a candidate whose thumbnail differs from the last KEPT frame's by less
  than `dedup_threshold` (mean absolute difference over the thumbnail pixels lit in either,
  0-255 scale) is skipped and the next frame becomes the candidate (frozen cine, repeated
  frames). 0 turns it off. The default 0.25 comes from COVID-BLUES (362 Lumify loops): at
  3 fps, 2 of 3,609 consecutive kept-frame pairs differ by less (a nearly still loop), while
  one frame repeated and re-encoded (libx264 or mpeg4) differs by at most 0.04.
* Colour: a kept frame with more than 0.01 % coloured pixels (channel spread > 16) makes the
  whole video RGB: every frame is then returned as (H, W, 3) uint8 so the writer can inpaint
  overlays before grayscale; otherwise frames are uint8 HxW (ITU-R 601-2 luma, as PIL "L").
* Region: the SAME mask for every frame, from the pixels that vary over time: the per-pixel
  standard deviation over all non-blank decoded frames (on a copy box-reduced to about
  `region.work_size` px) above `motion_threshold` and above `motion_relative` x the median
  std of those pixels (drops codec ringing around the scan), then as `region.detect_region` does:
  opening, the largest component(s), closing, holes filled, convex hull, drawn at full
  resolution. Static text, logos, calipers and the black surround do not vary and fall out.
  With fewer than two non-blank frames, or a motion region under `region.min_area_fraction`
  of the frame (a frozen loop), the region falls back to `detect_region` on the mean of the
  kept frames; `info["region_method"]` says which ("motion" or "mean_frame") and
  `info["region_note"]` why.

Memory: at most `max_frames` kept frames plus two float accumulators at work size.
Corrupt or truncated files raise ValueError from `frames()` (the writer skips the item and
records the reason); they never stop the listing, which only looks at file names.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from scipy import ndimage

from usjepa.errors import UserError
from usjepa.ingest.region import (
    RegionSettings,
    detect_region,
    fill_polygon,
    hull_polygon,
    largest_components,
)
from usjepa.shardset.sample import make_key
from usjepa.ingest.sources import (
    DEFAULT_EXCLUDE,
    Loaded,
    Source,
    SourceItem,
    compile_pattern,
    group_from_pattern,
    pattern_grouping,
    register_source,
)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mpg", ".mpeg", ".mkv", ".webm", ".gif")
LABEL_MODES = ("auto", "folders", "none")
DEFAULT_FPS = 3.0
DEFAULT_MAX_FRAMES = 30
DEFAULT_DEDUP_THRESHOLD = 0.25
DEFAULT_MOTION_THRESHOLD = 1.0
DEFAULT_MOTION_RELATIVE = 0.1
THUMB_SIZE = 32
COLOR_TOLERANCE = 16  # channel spread that counts as colour (as sources.color_fraction)
COLOR_MIN_FRACTION = 1e-4  # share of coloured pixels that makes a frame (and its video) colour
TRUNCATED_FRACTION = 0.9  # fewer decoded frames than this share of the header's count: truncated
LOOKS_LIKE_SAMPLE = 200  # files looked at by `looks_like`
_TIME_EPS = 1e-4  # seconds: float slack when a frame's time meets a grid point
# first-level folder names that are identifiers, not classes (auto label mode)
_ID_FOLDER = re.compile(r"^(?:(?:patient|subject|case|study|pt|id|p)[\s_-]*)?\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class VideoSettings:
    """How frames are taken from a video (recorded in the manifest under source_stats)."""

    fps: float = DEFAULT_FPS
    max_frames: int = DEFAULT_MAX_FRAMES
    dedup_threshold: float = DEFAULT_DEDUP_THRESHOLD
    motion_threshold: float = DEFAULT_MOTION_THRESHOLD
    """Per-pixel temporal standard deviation (0-255 scale, on the work-size copy) above
    which a pixel counts as varying (part of the scan): the floor above codec noise on
    static pixels (static text, black surround). COVID-BLUES: the dark far field of the
    scan varies by 1-2, static pixels by 0."""
    motion_relative: float = DEFAULT_MOTION_RELATIVE
    """...and above this fraction of the median std of the pixels over the floor: codec
    ringing just outside a moving scan grows with the scan's contrast (a lossy encode of
    bright speckle rings by up to ~9 around it), the scan's own variation with it."""
    blank_level: float = 8.0
    region: RegionSettings = field(default_factory=RegionSettings)

    def problems(self) -> list[str]:
        out = []
        if not _is_number(self.fps) or not self.fps >= 0 or math.isinf(self.fps):
            out.append(f"fps {self.fps!r} must be a number >= 0 (0: every frame)")
        if not isinstance(self.max_frames, int) or isinstance(self.max_frames, bool) or self.max_frames < 0:
            out.append(f"max frames {self.max_frames!r} must be an integer >= 0 (0: no cap)")
        if not _is_number(self.dedup_threshold) or not 0 <= self.dedup_threshold <= 255:
            out.append(f"dedup threshold {self.dedup_threshold!r} must be in [0, 255] (0: off)")
        if not _is_number(self.motion_threshold) or not 0 <= self.motion_threshold <= 255:
            out.append(f"motion threshold {self.motion_threshold!r} must be in [0, 255]")
        if not _is_number(self.motion_relative) or not 0 <= self.motion_relative < 1:
            out.append(f"motion relative {self.motion_relative!r} must be in [0, 1)")
        if not _is_number(self.blank_level) or not 0 <= self.blank_level < 255:
            out.append(f"blank level {self.blank_level!r} must be in [0, 255)")
        return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


# ---------------------------------------------------------------------------- decoding
@dataclass
class _Kept:
    index: int
    time: float
    image: np.ndarray  # uint8 HxW, or HxWx3 when the frame has colour
    color_fraction: float


def _thumb(small: np.ndarray) -> np.ndarray:
    img = Image.fromarray(small).resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32)


def thumb_difference(a: np.ndarray, b: np.ndarray, blank_level: float = 8.0) -> float:
    """Mean absolute difference of two thumbnails over the pixels lit (above `blank_level`)
    in either, so a small scan in a large black frame is not diluted by the surround."""
    lit = np.maximum(a, b) > blank_level
    return float(np.abs(a - b)[lit].mean()) if lit.any() else 0.0


def _color_fraction(rgb: np.ndarray) -> float:
    c = rgb.astype(np.int16)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    spread = np.maximum(np.maximum(np.abs(r - g), np.abs(g - b)), np.abs(r - b))
    return float(np.count_nonzero(spread > COLOR_TOLERANCE)) / spread.size


def _rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"))


def _stream_rate(stream) -> float | None:
    for name in ("average_rate", "guessed_rate", "base_rate"):
        rate = getattr(stream, name, None)
        if rate:
            return float(rate)
    return None


def _duration(stream, container) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


def read_video(path, settings: VideoSettings = VideoSettings(), name: str | None = None) -> list[Loaded]:
    """Decode `path` once and return the kept frames (see the module doc), each with the
    video's region and info. Raises ValueError for unreadable, truncated or empty videos."""
    import av
    from av.video.reformatter import VideoReformatter

    name = name or str(path)
    reformatter = VideoReformatter()  # one per video: a frame's own reformat() rebuilds the scaler each call
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot open video {name}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ValueError(f"{name} holds no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_fps = _stream_rate(stream)
        duration = _duration(stream, container)
        listed = int(stream.frames or 0)
        codec = stream.codec_context.name
        rate = settings.fps if settings.fps > 0 else math.inf
        if settings.max_frames and duration:
            rate = min(rate, settings.max_frames / duration)
        kept: list[_Kept] = []
        shape = None
        acc = acc_sq = None
        motion_frames = blank = duplicates = decoded = 0
        t0 = next_t = origin = None
        last_thumb = None
        last_t = -math.inf
        try:
            for frame in container.decode(stream):
                index = decoded
                decoded += 1
                t = frame.time
                if t is None:
                    t = index / src_fps if src_fps else float(index)
                t = max(float(t), last_t)  # decoders emit presentation order; guard odd streams
                last_t = t
                if origin is None:
                    origin = t  # info["time"] counts from the first frame (MPEG-PS starts at ~0.5 s)
                if shape is None:
                    shape = (frame.height, frame.width)
                    factor = max(1, min(shape) // max(1, settings.region.work_size))
                    small_shape = (max(1, shape[0] // factor), max(1, shape[1] // factor))
                    acc = np.zeros(small_shape, dtype=np.float64)
                    acc_sq = np.zeros(small_shape, dtype=np.float64)
                elif (frame.height, frame.width) != shape:
                    raise ValueError(
                        f"{name}: frame {index} is {frame.width}x{frame.height}, earlier frames "
                        f"{shape[1]}x{shape[0]} (size changes mid-video)"
                    )
                small = reformatter.reformat(
                    frame, width=small_shape[1], height=small_shape[0], format="gray", interpolation="AREA"
                ).to_ndarray()
                thumb = _thumb(small)
                if thumb.max() <= settings.blank_level:
                    blank += 1
                    continue
                s = small.astype(np.float64)
                acc += s
                acc_sq += s * s
                motion_frames += 1
                if t0 is None:
                    t0 = next_t = t
                if settings.max_frames and len(kept) >= settings.max_frames:
                    continue  # decode on: the motion region uses every frame
                if t + _TIME_EPS < next_t:
                    continue
                if (
                    last_thumb is not None
                    and settings.dedup_threshold > 0
                    and thumb_difference(thumb, last_thumb, settings.blank_level) < settings.dedup_threshold
                ):
                    duplicates += 1
                    continue  # the next frame is the candidate for this grid point
                rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
                colour = _color_fraction(rgb)
                image = rgb if colour > COLOR_MIN_FRACTION else _rgb_to_gray(rgb)
                kept.append(_Kept(index, t - origin, image, colour))
                last_thumb = thumb
                if math.isfinite(rate):
                    next_t = t0 + (math.floor((t - t0) * rate + 1e-6) + 1) / rate
        except av.FFmpegError as exc:
            raise ValueError(
                f"cannot decode video {name} after {decoded} frame(s) (corrupt or truncated?): {exc}"
            ) from exc
    if decoded == 0:
        raise ValueError(f"video {name} has no decodable frame")
    if listed and decoded < TRUNCATED_FRACTION * listed:
        raise ValueError(f"video {name} ends after {decoded} of the {listed} frames its header lists (truncated?)")
    if not kept:
        raise ValueError(f"video {name}: all {decoded} decoded frame(s) are blank (at most {settings.blank_level})")

    region, method, note = _video_region(acc, acc_sq, motion_frames, shape, kept, settings)
    region.setflags(write=False)  # one array shared by every frame of the video
    is_colour = any(k.image.ndim == 3 for k in kept)
    common = {
        "source_fps": round(src_fps, 4) if src_fps else None,
        "sample_fps": round(rate, 4) if math.isfinite(rate) else None,
        "video_size": [shape[1], shape[0]],
        "orig_size": [shape[1], shape[0]],
        "orig_mode": "RGB" if is_colour else "L",
        "codec": codec,
        "duration": round(duration, 4) if duration else None,
        "region_method": method,
        "frames_decoded": decoded,
        "frames_kept": len(kept),
        "frames_duplicate": duplicates,
        "frames_blank": blank,
    }
    if note:
        common["region_note"] = note
    out = []
    for k in kept:
        image = k.image
        if is_colour and image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        info = {"frame": k.index, "time": round(k.time, 4), **common, "color_fraction": round(k.color_fraction, 4)}
        out.append(Loaded(image, region, info))
    return out


# ---------------------------------------------------------------------------- region
def _odd(fraction: float, shape: tuple[int, ...]) -> int:
    size = round(fraction * min(shape))
    return size | 1 if size >= 2 else 1


def motion_mask(
    std: np.ndarray, shape: tuple[int, int], threshold: float, relative: float, settings: RegionSettings
) -> np.ndarray:
    """Full-resolution (`shape`) region from a work-size map of per-pixel temporal std:
    varying pixels (std above `threshold` and above `relative` x the median std of the
    pixels above `threshold`), opened, largest component(s), closed, holes filled, convex hull."""
    varying = std > threshold
    if varying.any() and relative > 0:
        varying = std > max(threshold, relative * float(np.median(std[varying])))
    mask = varying.astype(np.uint8)
    opening = _odd(settings.open_fraction, mask.shape)
    if opening > 1:
        mask = ndimage.maximum_filter(ndimage.minimum_filter(mask, opening, mode="nearest"), opening, mode="nearest")
    mask = largest_components(mask > 0, settings.keep_fraction)
    if not mask.any():
        return np.zeros(shape, dtype=bool)
    close = _odd(settings.close_fraction, mask.shape)
    if close > 1:
        m = mask.view(np.uint8)
        mask = ndimage.minimum_filter(ndimage.maximum_filter(m, close, mode="nearest"), close, mode="nearest") > 0
    if settings.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    full = mask
    if mask.shape != shape:
        img = Image.fromarray(mask.view(np.uint8) * np.uint8(255))
        full = np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127
    if settings.convex_hull:
        vertices = hull_polygon(mask)
        if vertices is not None:
            scale = np.array([shape[1] / mask.shape[1], shape[0] / mask.shape[0]])
            full = full | fill_polygon((vertices + 0.5) * scale - 0.5, shape)
    return full


def _video_region(acc, acc_sq, n, shape, kept: list[_Kept], settings: VideoSettings):
    """(region, method, note): the motion region, or detect_region on the mean kept frame."""
    note = None
    if n >= 2:
        mean = acc / n
        std = np.sqrt(np.maximum(acc_sq / n - mean * mean, 0.0))
        region = motion_mask(std, shape, settings.motion_threshold, settings.motion_relative, settings.region)
        fraction = float(region.mean())
        if fraction >= settings.region.min_area_fraction:
            return region, "motion", None
        note = (
            f"varying pixels cover {fraction:.1%} of the frame (< {settings.region.min_area_fraction:.0%}: "
            "a still loop); region from the mean frame"
        )
    else:
        note = f"{n} non-blank frame(s): too few for a motion region; region from the mean frame"
    gray = [k.image if k.image.ndim == 2 else _rgb_to_gray(k.image) for k in kept]
    mean_frame = np.rint(np.mean(gray, axis=0)).astype(np.uint8) if len(gray) > 1 else gray[0]
    return detect_region(mean_frame, settings.region), "mean_frame", note


# ---------------------------------------------------------------------------- items
@dataclass(frozen=True)
class VideoItem(SourceItem):
    path: Path = field(default=Path(), compare=False)
    settings: VideoSettings = field(default_factory=VideoSettings, compare=False)

    def frames(self) -> Iterator[Loaded]:
        """The kept frames (the whole video is decoded first: the region needs every frame)."""
        yield from read_video(self.path, self.settings, self.source)

    def load(self) -> Loaded:
        """The first kept frame (decodes the whole video)."""
        return read_video(self.path, self.settings, self.source)[0]


def _walk(root: Path) -> Iterator[Path]:
    """Every non-hidden file under root, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def is_video_name(name: str) -> bool:
    return name.lower().endswith(VIDEO_SUFFIXES)


@register_source("video")
class VideoSource(Source):
    """A folder tree of videos; every video is one item whose `frames()` are its sampled frames.

    labels: 'folders' (root/<class>/..., sorted names give labels 0..n-1), 'none' (label -1,
    class_name ''), or 'auto' (folders when the root holds only folders, at least two, none
    named like an identifier (digits, 'patient_12', ...) and fewer folders than half the
    videos; else none). group_pattern: regex whose first capture group, searched in the file
    stem, is the group (e.g. r'^patient_(\\d+)_' for COVID-BLUES); without it each video is
    its own group (its frames never straddle splits). exclude_pattern: regex on the stem.
    fps, max_frames, dedup_threshold, motion_threshold, motion_relative, blank_level, region:
    see the module doc and `VideoSettings` (region: a RegionSettings or a mapping of its fields).
    """

    looks_for: ClassVar[str] = (
        "mostly video files (" + ", ".join(VIDEO_SUFFIXES) + "; GIFs only when animated) anywhere below the root"
    )

    def __init__(
        self,
        root,
        labels: str = "auto",
        group_pattern: str | None = None,
        exclude_pattern: str | None = DEFAULT_EXCLUDE,
        fps: float = DEFAULT_FPS,
        max_frames: int = DEFAULT_MAX_FRAMES,
        dedup_threshold: float = DEFAULT_DEDUP_THRESHOLD,
        motion_threshold: float = DEFAULT_MOTION_THRESHOLD,
        motion_relative: float = DEFAULT_MOTION_RELATIVE,
        blank_level: float = 8.0,
        region: RegionSettings | dict | None = None,
    ):
        self.root = Path(root).expanduser().absolute()
        if isinstance(region, dict):
            try:
                region = RegionSettings(**region)
            except TypeError as exc:
                names = ", ".join(f.name for f in fields(RegionSettings))
                raise UserError(
                    f"invalid region option {region!r} for the video source ({exc}); fields: {names}"
                ) from None
        elif region is not None and not isinstance(region, RegionSettings):
            raise UserError(f"region option {region!r} must be a mapping of RegionSettings fields")
        self.settings = VideoSettings(
            fps=fps,
            max_frames=max_frames,
            dedup_threshold=dedup_threshold,
            motion_threshold=motion_threshold,
            motion_relative=motion_relative,
            blank_level=blank_level,
            region=region or RegionSettings(),
        )
        problems = self.settings.problems()
        if labels not in LABEL_MODES:
            problems.append(f"labels {labels!r} is not one of {', '.join(LABEL_MODES)}")
        if problems:
            raise UserError(f"invalid video source options for {self.root}: " + "; ".join(problems))
        self.labels = labels
        self.group_pattern = group_pattern
        self.exclude_pattern = exclude_pattern
        self._group_rx = compile_pattern(group_pattern, "group pattern", need_group=True)
        self._exclude_rx = compile_pattern(exclude_pattern, "exclude pattern", need_group=False)
        self._items, self._stats, self.classes, self.label_mode = self._scan()

    def _scan(self):
        root = self.root
        how = f"put the videos ({', '.join(VIDEO_SUFFIXES)}) under {root}, in one subfolder per class or unlabelled"
        if not root.exists():
            raise UserError(f"source folder {root} does not exist; check the path ({how})")
        if not root.is_dir():
            raise UserError(f"source {root} is not a folder; {how}")
        found: list[tuple[str, Path]] = []
        extensions: Counter = Counter()
        excluded = ignored = 0
        for path in _walk(root):
            if not is_video_name(path.name):
                ignored += 1
                continue
            rel = path.relative_to(root).as_posix()
            if self._exclude_rx is not None and self._exclude_rx.search(path.stem):
                excluded += 1
                continue
            found.append((rel, path))
            extensions[path.suffix.lower()] += 1
        if not found:
            raise UserError(
                f"no videos ({', '.join(VIDEO_SUFFIXES)}) found under {root} ({ignored} other file(s), "
                f"{excluded} excluded by {self.exclude_pattern!r}); {how}"
            )
        label_mode, label_note = self._label_mode(root, found)
        if label_mode == "folders":
            classes = sorted({rel.split("/", 1)[0] for rel, _ in found})
        else:
            classes = []
        labels = {c: i for i, c in enumerate(classes)}
        items = []
        for rel, path in found:
            cls = rel.split("/", 1)[0] if label_mode == "folders" else ""
            items.append(
                VideoItem(
                    key=make_key(rel),
                    source=rel,
                    label=labels[cls] if label_mode == "folders" else -1,
                    class_name=cls,
                    group=group_from_pattern(self._group_rx, self.group_pattern, rel, path, "video"),
                    path=path,
                    settings=self.settings,
                )
            )
        first_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        stats = {
            "videos_found": len(items),
            "extensions": dict(sorted(extensions.items())),
            "non_video_files": ignored,
            "excluded": excluded,
            "exclude_pattern": self.exclude_pattern,
            "labels": label_mode,
            "label_note": label_note,
            "sampling": _settings_dict(self.settings),
        }
        if label_mode == "folders":
            stats["empty_class_folders"] = [d for d in first_dirs if d not in labels]
        return items, stats, classes, label_mode

    def _label_mode(self, root: Path, found) -> tuple[str, str]:
        loose = [rel for rel, _ in found if "/" not in rel]
        if self.labels == "none":
            return "none", "unlabelled (labels='none')"
        if self.labels == "folders":
            if loose:
                raise UserError(
                    f"labels='folders' needs one subfolder per class in {root}, but {len(loose)} video(s) sit directly "
                    f"in it (e.g. {loose[0]!r}); move them into class folders ({root}/<class>/...) or use labels='none'"
                )
            return "folders", "first-level folder names (labels='folders')"
        if loose:
            return "none", "unlabelled: videos sit directly in the root, not only in class folders"
        folders = sorted({rel.split("/", 1)[0] for rel, _ in found})
        if len(folders) < 2:
            return "none", "unlabelled: the videos sit in a single folder (an export folder, not classes)"
        if any(_ID_FOLDER.match(f) for f in folders):
            return "none", "unlabelled: first-level folders are named like identifiers (patients, cases), not classes"
        if len(folders) * 2 > len(found):
            return "none", "unlabelled: about one video per first-level folder (patient folders, not classes)"
        return "folders", "first-level folder names (auto: every video sits in one of several folders)"

    @classmethod
    def looks_like(cls, root) -> bool:
        """True when most files in the tree (looking at up to 200) are videos. GIFs count only
        when animated, and only when they are not all there is (an all-GIF tree of stills is
        an image folder)."""
        root = Path(root)
        if not root.is_dir():
            return False
        videos = gifs = others = 0
        gif_paths = []
        for n, path in enumerate(_walk(root)):
            if n >= LOOKS_LIKE_SAMPLE:
                break
            name = path.name.lower()
            if name.endswith(".gif"):
                gifs += 1
                gif_paths.append(path)
            elif is_video_name(name):
                videos += 1
            else:
                others += 1
        animated = sum(_is_animated_gif(p) for p in gif_paths[:20])
        if gif_paths and animated * 2 > min(len(gif_paths), 20):
            videos += gifs
        else:
            others += gifs
        return videos > 0 and videos * 2 > videos + others

    def grouping(self) -> dict:
        return pattern_grouping(self.group_pattern, "video", "no group_pattern given: each video is its own group "
                                "(its frames stay in one split), but videos of one patient can fall on both "
                                "sides of a split")


def _settings_dict(settings: VideoSettings) -> dict:
    out = asdict(settings)
    out["thumbnail"] = f"{THUMB_SIZE}x{THUMB_SIZE} box-averaged grayscale"
    out["colour_min_fraction"] = COLOR_MIN_FRACTION
    return out


def _is_animated_gif(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            return getattr(img, "n_frames", 1) > 1
    except (OSError, ValueError, SyntaxError):  # an unreadable GIF is no evidence either way
        return False


# ---------------------------------------------------------------------------- benchmark
def benchmark(paths, settings: VideoSettings = VideoSettings()) -> dict:
    """Decode and sample `paths` in this process; frames decoded and kept per second."""
    decoded = kept = 0
    failed = []
    start = time.perf_counter()
    for path in paths:
        try:
            frames = read_video(path, settings)
        except ValueError as exc:
            failed.append(f"{path}: {exc}")
            continue
        decoded += frames[0].info["frames_decoded"]
        kept += len(frames)
    seconds = time.perf_counter() - start
    return {
        "videos": len(paths) - len(failed),
        "failed": failed,
        "frames_decoded": decoded,
        "frames_kept": kept,
        "seconds": round(seconds, 3),
        "decoded_per_s": round(decoded / seconds, 1) if seconds > 0 else None,
        "kept_per_s": round(kept / seconds, 1) if seconds > 0 else None,
    }


if __name__ == "__main__":  # python -m usjepa.ingest.video VIDEO...
    import json
    import sys

    print(json.dumps(benchmark([Path(p) for p in sys.argv[1:]]), indent=2))
