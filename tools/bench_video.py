"""Video ingest throughput: decode and sample videos in one process, as a build's worker does.

    python tools/bench_video.py VIDEO [VIDEO ...] [--fps 3] [--max-frames 30]

Prints frames decoded and kept per second (JSON). Example, every COVID-BLUES loop:
    python tools/bench_video.py ../shared/data/covid-blues/lus_videos/*.mp4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from usjepa.ingest.sources.video_frames import VideoSettings, benchmark  # noqa: E402


def main() -> None:
    defaults = VideoSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", nargs="+", type=Path)
    parser.add_argument(
        "--fps", type=float, default=defaults.fps, help=f"frames kept per second (default {defaults.fps})"
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=defaults.max_frames,
        help=f"frames kept per video at most (default {defaults.max_frames})",
    )
    args = parser.parse_args()
    settings = dataclasses.replace(defaults, fps=args.fps, max_frames=args.max_frames)
    print(json.dumps(benchmark(args.videos, settings), indent=2))


if __name__ == "__main__":
    main()
