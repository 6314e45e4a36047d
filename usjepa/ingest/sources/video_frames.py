"""Frames out of one video: sampled by presentation time, blank and near-duplicate frames
dropped, one region for all frames from the pixels that vary over time
(docs/data.md#sources, "video")."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from usjepa.ingest.image.overlay import colour_fraction, luma
from usjepa.ingest.image.region import RegionSettings, detect_region, shape_region
from usjepa.ingest.ranges import range_problems
from usjepa.ingest.sources.base import Loaded

THUMB_SIZE = 32
COLOR_MIN_FRACTION = 1e-4  # share of coloured pixels that makes a frame (and its video) colour
TRUNCATED_FRACTION = 0.9  # fewer decoded frames than this share of the header's count: truncated
_TIME_EPS = 1e-4  # seconds: float slack when a frame's time meets a grid point


@dataclass(frozen=True)
class VideoSettings:
    """How frames are taken from a video (recorded in the manifest under source_stats)."""

    fps: float = 3.0
    max_frames: int = 30
    dedup_threshold: float = 0.25
    """A frame whose thumbnail differs from the last kept one by less (mean absolute difference
    over lit pixels, 0-255) is a near-duplicate and skipped (0: off). COVID-BLUES: a repeated,
    re-encoded frame differs by at most 0.04, real consecutive frames at 3 fps rarely by < 0.25."""
    motion_threshold: float = 1.0
    """Temporal std (0-255, work size) above which a pixel varies: the floor above codec noise."""
    motion_relative: float = 0.1
    """...and above this fraction of the median std of the varying pixels: drops codec ringing
    around a moving scan, which grows with the scan's contrast."""
    blank_level: float = 8.0
    region: RegionSettings = field(default_factory=RegionSettings)

    def problems(self) -> list[str]:
        return range_problems(self, VIDEO_RULES)


VIDEO_RULES = {
    "fps": "number >= 0 (0: every frame)",
    "max_frames": "integer >= 0 (0: no cap)",
    "dedup_threshold": "number in [0, 255] (0: off)",
    "motion_threshold": "number in [0, 255]",
    "motion_relative": "number in [0, 1)",
    "blank_level": "number in [0, 255)",
}


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
    """Mean absolute difference of two thumbnails over the pixels lit in either, so a small
    scan in a large black frame is not diluted by the surround."""
    lit = np.maximum(a, b) > blank_level
    return float(np.abs(a - b)[lit].mean()) if lit.any() else 0.0


def _stream_facts(stream, container) -> tuple[float | None, float | None]:
    """(nominal frame rate, duration in seconds) of a stream, where the container states them."""
    rate = next(
        (float(r) for r in (getattr(stream, n, None) for n in ("average_rate", "guessed_rate", "base_rate")) if r), None
    )
    if stream.duration and stream.time_base:
        return rate, float(stream.duration * stream.time_base)
    return rate, (container.duration / 1_000_000 if container.duration else None)  # av.time_base: microseconds


class _Sampler:
    """Walks the decoded frames of one video once: motion statistics over every non-blank frame,
    the kept frames on a time grid."""

    def __init__(self, settings: VideoSettings, name: str, src_fps: float | None, duration: float | None):
        from av.video.reformatter import VideoReformatter

        self.settings, self.name, self.src_fps = settings, name, src_fps
        self.reformatter = VideoReformatter()  # one per video: a frame's own reformat() rebuilds the scaler
        self.rate = settings.fps if settings.fps > 0 else math.inf
        if settings.max_frames and duration:
            self.rate = min(self.rate, settings.max_frames / duration)  # kept frames span the whole loop
        self.kept: list[_Kept] = []
        self.shape = self.small_shape = self.acc = self.acc_sq = None
        self.motion_frames = self.blank = self.duplicates = self.decoded = 0
        self.t0 = self.next_t = self.origin = self.last_thumb = None
        self.last_t = -math.inf

    def feed(self, frame) -> None:
        index = self.decoded
        self.decoded += 1
        t = frame.time
        if t is None:
            t = index / self.src_fps if self.src_fps else float(index)
        t = self.last_t = max(float(t), self.last_t)  # decoders emit presentation order; guard odd streams
        if self.origin is None:
            self.origin = t  # info["time"] counts from the first frame (MPEG-PS starts at ~0.5 s)
        self._check_shape(frame, index)
        small = self.reformatter.reformat(
            frame, width=self.small_shape[1], height=self.small_shape[0], format="gray", interpolation="AREA"
        ).to_ndarray()
        thumb = _thumb(small)
        if thumb.max() <= self.settings.blank_level:
            self.blank += 1
            return
        s = small.astype(np.float64)
        self.acc += s
        self.acc_sq += s * s
        self.motion_frames += 1
        if self.t0 is None:
            self.t0 = self.next_t = t
        if self.wants(t, thumb):
            self._keep(frame, index, t, thumb)

    def _check_shape(self, frame, index: int) -> None:
        if self.shape is None:
            self.shape = (frame.height, frame.width)
            factor = max(1, min(self.shape) // max(1, self.settings.region.work_size))
            self.small_shape = (max(1, self.shape[0] // factor), max(1, self.shape[1] // factor))
            self.acc = np.zeros(self.small_shape, dtype=np.float64)
            self.acc_sq = np.zeros(self.small_shape, dtype=np.float64)
        elif (frame.height, frame.width) != self.shape:
            raise ValueError(
                f"{self.name}: frame {index} is {frame.width}x{frame.height}, earlier frames "
                f"{self.shape[1]}x{self.shape[0]} (size changes mid-video)"
            )

    def wants(self, t: float, thumb: np.ndarray) -> bool:
        s = self.settings
        if (s.max_frames and len(self.kept) >= s.max_frames) or t + _TIME_EPS < self.next_t:
            return False  # decode on all the same: the motion region uses every frame
        if (
            self.last_thumb is not None
            and s.dedup_threshold > 0
            and thumb_difference(thumb, self.last_thumb, s.blank_level) < s.dedup_threshold
        ):
            self.duplicates += 1
            return False  # the next frame is the candidate for this grid point
        return True

    def _keep(self, frame, index: int, t: float, thumb: np.ndarray) -> None:
        rgb = self.reformatter.reformat(frame, format="rgb24").to_ndarray()
        colour = colour_fraction(rgb)
        self.kept.append(_Kept(index, t - self.origin, rgb if colour > COLOR_MIN_FRACTION else luma(rgb), colour))
        self.last_thumb = thumb
        if math.isfinite(self.rate):
            self.next_t = self.t0 + (math.floor((t - self.t0) * self.rate + 1e-6) + 1) / self.rate


def read_video(path, settings: VideoSettings = VideoSettings(), name: str | None = None) -> list[Loaded]:
    """Decode `path` once; the kept frames, each with the video's region and info. ValueError
    for unreadable, truncated or empty videos."""
    import av

    name = name or str(path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot open video {name}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ValueError(f"{name} holds no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_fps, duration = _stream_facts(stream, container)
        listed, codec = int(stream.frames or 0), stream.codec_context.name
        sampler = _Sampler(settings, name, src_fps, duration)
        try:
            for frame in container.decode(stream):
                sampler.feed(frame)
        except av.FFmpegError as exc:
            raise ValueError(
                f"cannot decode video {name} after {sampler.decoded} frame(s) (corrupt or truncated?): {exc}"
            ) from exc
    decoded = sampler.decoded
    if decoded == 0:
        raise ValueError(f"video {name} has no decodable frame")
    if listed and decoded < TRUNCATED_FRACTION * listed:
        raise ValueError(f"video {name} ends after {decoded} of the {listed} frames its header lists (truncated?)")
    if not sampler.kept:
        raise ValueError(f"video {name}: all {decoded} decoded frame(s) are blank (at most {settings.blank_level})")
    return _frames_out(sampler, codec, duration)


def _frames_out(sampler: _Sampler, codec: str, duration: float | None) -> list[Loaded]:
    region, method, note = _video_region(sampler)
    region.setflags(write=False)  # one array shared by every frame of the video
    kept, shape, rate = sampler.kept, sampler.shape, sampler.rate
    is_colour = any(k.image.ndim == 3 for k in kept)
    common = {
        "source_fps": round(sampler.src_fps, 4) if sampler.src_fps else None,
        "sample_fps": round(rate, 4) if math.isfinite(rate) else None,
        "video_size": [shape[1], shape[0]],
        "orig_size": [shape[1], shape[0]],
        "orig_mode": "RGB" if is_colour else "L",
        "codec": codec,
        "duration": round(duration, 4) if duration else None,
        "region_method": method,
        "frames_decoded": sampler.decoded,
        "frames_kept": len(kept),
        "frames_duplicate": sampler.duplicates,
        "frames_blank": sampler.blank,
    }
    if note:
        common["region_note"] = note
    out = []
    for k in kept:
        image = np.repeat(k.image[:, :, None], 3, axis=2) if is_colour and k.image.ndim == 2 else k.image
        info = {"frame": k.index, "time": round(k.time, 4), **common, "color_fraction": round(k.color_fraction, 4)}
        out.append(Loaded(image, region, info))
    return out


def motion_mask(
    std: np.ndarray, shape: tuple[int, int], threshold: float, relative: float, settings: RegionSettings
) -> np.ndarray:
    """Full-resolution region from a work-size map of per-pixel temporal std: the varying
    pixels (above `threshold` and `relative` x their median std), shaped as `detect_region` does."""
    varying = std > threshold
    if varying.any() and relative > 0:
        varying = std > max(threshold, relative * float(np.median(std[varying])))
    scale = np.array([shape[1] / std.shape[1], shape[0] / std.shape[0]])
    return shape_region(varying, shape, settings, scale)


def _video_region(sampler: _Sampler):
    """(region, method, note): the motion region, or detect_region on the mean kept frame."""
    settings, n = sampler.settings, sampler.motion_frames
    if n >= 2:
        mean = sampler.acc / n
        std = np.sqrt(np.maximum(sampler.acc_sq / n - mean * mean, 0.0))
        region = motion_mask(std, sampler.shape, settings.motion_threshold, settings.motion_relative, settings.region)
        fraction = float(region.mean())
        if fraction >= settings.region.min_area_fraction:
            return region, "motion", None
        note = (
            f"varying pixels cover {fraction:.1%} of the frame (< {settings.region.min_area_fraction:.0%}: "
            "a still loop); region from the mean frame"
        )
    else:
        note = f"{n} non-blank frame(s): too few for a motion region; region from the mean frame"
    gray = [k.image if k.image.ndim == 2 else luma(k.image) for k in sampler.kept]
    mean_frame = np.rint(np.mean(gray, axis=0)).astype(np.uint8) if len(gray) > 1 else gray[0]
    return detect_region(mean_frame, settings.region), "mean_frame", note


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
