"""The settings of a shard build (docs/data.md#build-steps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from usjepa.errors import UserError
from usjepa.ingest.image.overlay import LARGE_OVERLAY_ACTIONS, OverlaySettings
from usjepa.ingest.image.preprocess import INTERPOLATIONS, RESIZE_MODES, PreprocessSettings
from usjepa.ingest.image.region import RegionSettings
from usjepa.ingest.ranges import range_problems
from usjepa.ingest.sources.base import DEFAULT_EXCLUDE

DEFAULT_WEIGHT_CAP = 50_000  # docs/method.md#mixture-weights


@dataclass(frozen=True)
class ItemSettings:
    """Everything that changes the result of one item (what a worker needs)."""

    preprocess: PreprocessSettings
    overlay: OverlaySettings


@dataclass
class BuildSettings:
    """Each field is the flag of that name or a recipe `build:` key (docs/data.md#build-steps)."""

    image_size: int = 224
    shard_size: int = 1000
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    group_pattern: str | None = None
    overwrite: bool = False
    format: str = "auto"
    exclude_pattern: str | None = DEFAULT_EXCLUDE
    stratify: bool = True
    low_percentile: float = 2.0
    high_percentile: float = 98.0
    resize_mode: str = "pad"
    interpolation: str = "bicubic"
    region: RegionSettings = field(default_factory=RegionSettings)
    overlay: OverlaySettings = field(default_factory=OverlaySettings)
    large_overlay: str = "flag"
    dedup: bool = True
    max_samples: int | None = None
    weight_cap: int = DEFAULT_WEIGHT_CAP
    source_options: dict = field(default_factory=dict)  # checked against the format's `Options`

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

        rules = {"image_size": "integer >= 8", "shard_size": "integer >= 1", "weight_cap": "integer >= 1"}
        rules.update(val_fraction="number in [0, 1]", test_fraction="number in [0, 1]")
        if self.max_samples is not None:  # None: all samples
            rules["max_samples"] = "integer >= 1"
        problems = range_problems(self, rules)
        if self.val_fraction + self.test_fraction > 1:
            problems.append(f"val + test fractions ({self.val_fraction} + {self.test_fraction}) exceed 1")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            problems.append(f"percentiles {self.low_percentile}/{self.high_percentile} need 0 <= low < high <= 100")
        choices = {"resize_mode": RESIZE_MODES, "interpolation": list(INTERPOLATIONS), "format": format_choices()}
        for name, options in {**choices, "large_overlay": LARGE_OVERLAY_ACTIONS}.items():
            if getattr(self, name) not in options:
                problems.append(f"{name.replace('_', ' ')} {getattr(self, name)!r} is not one of {', '.join(options)}")
        if not isinstance(self.source_options, dict):
            problems.append(f"source options must be a mapping of option name to value, got {self.source_options!r}")
        problems += self.overlay.problems()
        if problems:
            raise UserError("invalid shard build settings: " + "; ".join(problems))
