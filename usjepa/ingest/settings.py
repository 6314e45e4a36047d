"""The settings of a shard build (docs/data.md#build-steps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from usjepa.errors import UserError
from usjepa.ingest.image.overlay import LARGE_OVERLAY_ACTIONS, OverlaySettings
from usjepa.ingest.image.preprocess import INTERPOLATIONS, RESIZE_MODES, PreprocessSettings
from usjepa.ingest.image.region import RegionSettings
from usjepa.ingest.sources.base import DEFAULT_EXCLUDE

DEFAULT_WEIGHT_CAP = 50_000  # docs/method.md#mixture-weights


@dataclass(frozen=True)
class ItemSettings:
    """Everything that changes the result of one item (what a worker needs)."""

    preprocess: PreprocessSettings
    overlay: OverlaySettings


@dataclass
class BuildSettings:
    image_size: int = 224
    shard_size: int = 1000
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    group_pattern: str | None = None
    overwrite: bool = False
    format: str = "auto"
    """'auto' (every format's `looks_like` is asked) or a registered format name."""
    exclude_pattern: str | None = DEFAULT_EXCLUDE
    stratify: bool = True
    low_percentile: float = 2.0
    high_percentile: float = 98.0
    resize_mode: str = "pad"
    interpolation: str = "bicubic"
    region: RegionSettings = field(default_factory=RegionSettings)
    overlay: OverlaySettings = field(default_factory=OverlaySettings)
    large_overlay: str = "flag"
    """Samples whose colour overlays cover >= overlay.max_fraction: 'flag' (keep, meta
    overlay_flagged: true) or 'skip' (leave out, listed in the build report)."""
    dedup: bool = True
    """Write identical preprocessed images once (content hash); duplicates are listed."""
    max_samples: int | None = None
    """Keep at most this many samples: the first ones in the seeded item order."""
    weight_cap: int = DEFAULT_WEIGHT_CAP
    """Manifest `sampling_weight` = min(train samples, weight_cap)."""
    source_options: dict = field(default_factory=dict)
    """The source format's options (e.g. fps=3, max_frames=30), checked against its `Options`."""

    def preprocess_settings(self) -> PreprocessSettings:
        return PreprocessSettings(
            image_size=self.image_size,
            low_percentile=self.low_percentile,
            high_percentile=self.high_percentile,
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
            region=self.region,
        )

    def item_settings(self) -> ItemSettings:
        return ItemSettings(self.preprocess_settings(), self.overlay)

    def validate(self) -> None:
        from usjepa.ingest.sources.detect import format_choices

        def choice(value, name: str, options) -> tuple[bool, str]:
            return value in options, f"{name} {value!r} is not one of {', '.join(options)}"

        positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
        checks = [
            (
                isinstance(self.image_size, int) and self.image_size >= 8,
                f"image size {self.image_size!r} must be an integer >= 8",
            ),
            (positive(self.shard_size), f"shard size {self.shard_size!r} must be an integer >= 1"),
            (0 <= self.val_fraction <= 1, f"val fraction {self.val_fraction} must be in [0, 1]"),
            (0 <= self.test_fraction <= 1, f"test fraction {self.test_fraction} must be in [0, 1]"),
            (
                self.val_fraction + self.test_fraction <= 1,
                f"val + test fractions ({self.val_fraction} + {self.test_fraction}) exceed 1",
            ),
            (
                0 <= self.low_percentile < self.high_percentile <= 100,
                f"percentiles {self.low_percentile}/{self.high_percentile} need 0 <= low < high <= 100",
            ),
            choice(self.resize_mode, "resize mode", RESIZE_MODES),
            choice(self.interpolation, "interpolation", list(INTERPOLATIONS)),
            choice(self.format, "source format", format_choices()),
            choice(self.large_overlay, "large overlay action", LARGE_OVERLAY_ACTIONS),
            (
                self.max_samples is None or positive(self.max_samples),
                f"max samples {self.max_samples!r} must be a positive integer (or unset)",
            ),
            (positive(self.weight_cap), f"weight cap {self.weight_cap!r} must be a positive integer"),
            (
                isinstance(self.source_options, dict),
                f"source options must be a mapping of option name to value, got {self.source_options!r}",
            ),
        ]
        problems = [why for ok, why in checks if not ok] + self.overlay.problems()
        if problems:
            raise UserError("invalid shard build settings: " + "; ".join(problems))
