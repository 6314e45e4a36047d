"""The manifest beside a shard set: what is in it, how it was made, how to check it. Written
last, so its presence means a complete build (docs/data.md#manifest)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "usjepa-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
REPORT_NAME = "build_report.json"
MAX_SKIPPED_LISTED = 100  # in the manifest; the build report lists all


@dataclass
class ShardInfo:
    name: str
    count: int
    sha256: str


@dataclass
class SplitInfo:
    count: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    groups: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    unlabelled: int = 0  # samples with label -1 (not in class_counts)


@dataclass
class Manifest:
    root: Path
    classes: list[str]
    image_size: int
    splits: dict[str, SplitInfo]
    source_root: str | None = ""  # None: not recorded (a DICOM root that could name a patient)
    source_format: str = "imagefolder"
    created: str = ""
    grouping: dict = field(default_factory=dict)
    split_settings: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    region_detection: dict = field(default_factory=dict)
    source_stats: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # the first MAX_SKIPPED_LISTED
    sample_format: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    tool: dict = field(default_factory=dict)
    num_skipped: int | None = None  # all skipped inputs (None: len(skipped))
    selection: dict = field(default_factory=dict)  # dedup, sample cap, overlay policy
    build_summary: dict = field(default_factory=dict)  # counts; details in build_report.json
    sampling_weight: int | None = None
    weight_cap: int | None = None

    def _split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise UserError(
                f"no split {split!r} in the shard set at {self.root}; known splits: {', '.join(self.splits)}"
            )
        return self.splits[split]

    def shard_paths(self, split: str) -> list[Path]:
        """Absolute shard paths of a split, in manifest order."""
        return [(self.root / s.name).absolute() for s in self._split(split).shards]

    def count(self, split: str) -> int:
        return self._split(split).count

    def class_counts(self, split: str) -> dict[str, int]:
        return dict(self._split(split).class_counts)

    @property
    def total(self) -> int:
        return sum(s.count for s in self.splits.values())

    @property
    def skipped_count(self) -> int:
        return len(self.skipped) if self.num_skipped is None else self.num_skipped

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "created": self.created,
            "tool": self.tool,
            "source": {
                **({} if self.source_root is None else {"root": self.source_root}),
                "format": self.source_format,
                **self.source_stats,
            },
            "grouping": self.grouping,
            "split_settings": self.split_settings,
            "image_size": self.image_size,
            "preprocessing": self.preprocessing,
            "region_detection": self.region_detection,
            "sample_format": self.sample_format,
            "classes": list(self.classes),
            "splits": {name: asdict(info) for name, info in self.splits.items()},
            "sampling_weight": self.sampling_weight,
            "weight_cap": self.weight_cap,
            "selection": self.selection,
            "build_summary": self.build_summary,
            "num_skipped": self.skipped_count,
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: dict, root: Path) -> Manifest:
        source = dict(data["source"])
        source_root = source.pop("root", None)  # absent: not recorded
        splits = {
            name: SplitInfo(
                count=int(info["count"]),
                class_counts={str(k): int(v) for k, v in info["class_counts"].items()},
                groups=int(info["groups"]),
                shards=[ShardInfo(str(s["name"]), int(s["count"]), str(s["sha256"])) for s in info["shards"]],
                unlabelled=int(info.get("unlabelled", 0)),
            )
            for name, info in data["splits"].items()
        }
        return cls(
            root=Path(root),
            classes=[str(c) for c in data["classes"]],
            image_size=int(data["image_size"]),
            splits=splits,
            source_root=None if source_root is None else str(source_root),
            source_format=str(source.pop("format")),
            created=str(data.get("created", "")),
            grouping=dict(data.get("grouping", {})),
            split_settings=dict(data.get("split_settings", {})),
            preprocessing=dict(data.get("preprocessing", {})),
            region_detection=dict(data.get("region_detection", {})),
            source_stats=source,
            skipped=list(data.get("skipped", [])),
            sample_format=dict(data.get("sample_format", {})),
            format_version=int(data["format_version"]),
            tool=dict(data.get("tool", {})),
            num_skipped=int(data["num_skipped"]) if data.get("num_skipped") is not None else None,
            selection=dict(data.get("selection") or {}),
            build_summary=dict(data.get("build_summary") or {}),
            sampling_weight=_opt_int(data.get("sampling_weight")),
            weight_cap=_opt_int(data.get("weight_cap")),
        )


def _opt_int(value) -> int | None:
    return None if value is None else int(value)


def write_manifest(manifest: Manifest) -> Path:
    """Write `root/manifest.json` atomically (temporary file, fsync, os.replace)."""
    return atomic_write_text(Path(manifest.root) / MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2) + "\n")


def load_manifest(shards_dir) -> Manifest:
    """Read a shard set's manifest (`shards_dir` is its folder or the manifest file itself)."""
    path = Path(shards_dir).expanduser()
    if path.is_dir() or path.suffix != ".json":
        path = path / MANIFEST_NAME
    hint = "build the shard set with `usjepa shards build SRC OUT`"
    if not path.is_file():
        raise UserError(f"no shard manifest at {path}; {hint} (or point to the folder that holds manifest.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"shard manifest {path} is unreadable ({exc}); rebuild it: {hint} --overwrite") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise UserError(f'{path} is not a US-JEPA shard manifest (no "format": "{FORMAT_NAME}"); {hint}')
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"shard manifest {path} has format version {version}, this usjepa reads {FORMAT_VERSION}; "
            f"rebuild it: {hint} --overwrite"
        )
    try:
        return Manifest.from_dict(data, root=path.parent.absolute())
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(
            f"shard manifest {path} is missing or has a bad field ({exc!r}); rebuild it: {hint} --overwrite"
        ) from None
