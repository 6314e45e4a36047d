"""The bench spec: which encoders, on which shard sets, with which protocols. Typed and
validated like a run config (an unknown key is an error with a suggestion), with dotted
`key=value` overrides (e.g. `out=/tmp/b` or `backbones.dinov2.path=/ckpt/dinov2.pth`)."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from usjepa.bench.loaders import EXTERNAL_KINDS
from usjepa.bench.protocols import FEWSHOT_FRACTIONS, ROBUSTNESS_KINDS, SEVERITIES
from usjepa.config import ProbeConfig, load_typed, require

KINDS = ("run", "export", "random", *EXTERNAL_KINDS)


@dataclass
class BackboneSpec:
    # Spelled through KINDS so that a new checkpoint kind of the loaders is accepted here too.
    kind: typing.Literal[KINDS] = "run"
    # run: a `usjepa train` run dir; export: a `usjepa export` folder; timm/open_clip/mae/beit:
    # a checkpoint file (.pth, .pt, .bin, .safetensors).
    path: str = ""
    encoder: typing.Literal["student", "teacher", "target"] = "student"  # which encoder of a run
    checkpoint: str = "best"  # of a run's student or EMA target: best, latest or step_N
    # The timm architecture of a checkpoint file or of a random init, e.g. vit_base_patch16_224.
    model: str = ""
    like: str = ""  # random: take the architecture of this run dir's encoder instead of `model`
    seed: int = 0  # random: the init seed
    # A checkpoint's input normalisation (per channel); empty: its config.json /
    # open_clip_config.json, else the architecture's pretrained_cfg.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    pooling: typing.Literal["mean", "cls", "model"] = "mean"  # external encoders; ours mean-pool


@dataclass
class FewShotSpec:
    enabled: bool = False
    fractions: tuple[float, ...] = FEWSHOT_FRACTIONS  # of the training labels, stratified, whole groups


@dataclass
class RobustnessSpec:
    enabled: bool = False
    kinds: tuple[str, ...] = ROBUSTNESS_KINDS
    severities: tuple[int, ...] = SEVERITIES  # 0 is the clean test set


@dataclass
class BenchSpec:
    out: str = "bench_out"
    datasets: dict[str, str] = field(default_factory=dict)  # name -> labelled shard folder
    backbones: dict[str, BackboneSpec] = field(default_factory=dict)
    image_size: int = 224  # every backbone sees the test images at this size
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: typing.Literal["fp32", "bf16"] = "fp32"  # feature extraction (the probes train in fp32)
    batch_size: int = 64  # images per extraction forward
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # linear and kNN probe settings, seeds
    fewshot: FewShotSpec = field(default_factory=FewShotSpec)
    robustness: RobustnessSpec = field(default_factory=RobustnessSpec)
    # How frame predictions become one per video (or group): mean probabilities or majority vote.
    video_rule: typing.Literal["mean", "majority"] = "mean"
    plots: bool = True


def _validate_backbone(name: str, b: BackboneSpec) -> None:
    key = f"backbones.{name}"
    if b.kind == "random":
        require(
            bool(b.like) != bool(b.model),
            key,
            "a random backbone takes its architecture from `like: RUN_DIR` or `model: TIMM_NAME` (exactly one)",
        )
    else:
        require(bool(b.path), f"{key}.path", f"a {b.kind} backbone needs `path`")
    require(b.kind in ("run", "random") or not b.like, f"{key}.like", "only a random backbone takes `like`")
    require(bool(b.mean) == bool(b.std), key, "mean and std go together: set both or neither")
    require(
        b.kind not in ("run", "export") or not (b.mean or b.model),
        key,
        f"a {b.kind} backbone carries its own architecture and normalisation; remove model/mean/std",
    )


def validate_bench(spec: BenchSpec) -> BenchSpec:
    require(bool(spec.datasets), "datasets", "name at least one labelled shard set (name: folder)")
    require(bool(spec.backbones), "backbones", "name at least one backbone (name: {kind: ..., path: ...})")
    for name, b in spec.backbones.items():
        _validate_backbone(name, b)
    require(spec.image_size > 0 and spec.batch_size > 0, "image_size", "image_size and batch_size must be > 0")
    require(bool(spec.probe.seeds), "probe.seeds", "needs at least one seed")
    for f in spec.fewshot.fractions:
        require(0 < f <= 1, "fewshot.fractions", f"{f} is not a fraction in (0, 1]")
    for kind in spec.robustness.kinds:
        require(kind in ROBUSTNESS_KINDS, "robustness.kinds", f"'{kind}' is not one of {', '.join(ROBUSTNESS_KINDS)}")
    for s in spec.robustness.severities:
        require(s in SEVERITIES, "robustness.severities", f"{s} is not one of {list(SEVERITIES)}")
    return spec


def load_bench(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> BenchSpec:
    return validate_bench(load_typed(BenchSpec, Path(path), overrides, example="configs/bench_ultrabench.yaml"))
