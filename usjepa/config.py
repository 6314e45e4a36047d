"""Typed run configuration: dataclasses, YAML loading, dotted `key=value` overrides.

Every setting lives in one dataclass below. Loading is strict: an unknown key or a value of
the wrong type fails before any work starts, naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from usjepa.errors import UserError


class ConfigError(UserError):
    """A configuration file or override that cannot be used as it is."""


class SettingError(ConfigError):
    """A value out of its range, or at odds with another setting (`require`): `key: why`.
    load_config blames it on the override or the file that set `key`."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


@dataclass
class RunConfig:
    dir: str = "runs/demo"  # run directory: resolved_config.yaml, checkpoints/, tb/
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # End this invocation at this step, after a checkpoint, without changing the schedule
    # (for time-sliced queues); 0 runs to train.total_steps, as does a step past it. A rerun
    # continues from there.
    stop_at_step: int = 0


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random resized crop, fraction of the area
    crop_ratio: tuple[float, float] = (0.75, 1.333)
    hflip: float = 0.5  # probabilities
    vflip: float = 0.5
    blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # pixels, at the output size
    speckle: float = 0.2
    speckle_std: float = 0.15  # sd of the multiplicative noise
    contrast: float = 0.3
    contrast_range: tuple[float, float] = (0.6, 1.4)  # factor around the in-region median


@dataclass
class MixtureEntry:
    shards: str  # a folder written by `usjepa shards build`
    # Relative share of the samples drawn from this set; 0 = the manifest's sampling_weight,
    # min(train samples, 50,000) as in the paper (docs/method.md#mixture-weights).
    weight: float = 0.0


@dataclass
class DataConfig:
    shards: str = ""  # a folder written by `usjepa shards build` (or use `mixture`)
    # Several shard sets drawn with replacement, each with its share of the samples, e.g.
    # [{shards: shards/busi, weight: 1}, {shards: shards/pocus, weight: 3}]. Instead of `shards`.
    mixture: tuple[MixtureEntry, ...] = ()
    split: str = "train"
    image_size: int = 64
    batch_size: int = 32  # global: samples per optimizer step, over all ranks
    # The global batch is made of one equal chunk from each of `streams` logical data streams,
    # each reading its own shards; ranks and loader workers divide the streams among them. The
    # data a step sees depends on this number alone, not on the world size or worker count, so
    # keep it fixed for a run (a multiple of every ranks x workers you plan to use, e.g. 64).
    streams: int = 1
    # Samples per forward/backward pass on a rank (gradient accumulation over the rest of the
    # rank's share of the batch); 0 = the rank's whole share in one pass. Does not change results.
    micro_batch_size: int = 0
    num_workers: int = 1  # loader processes per rank; must divide the streams a rank reads
    # A shard the manifest lists that is missing, unreadable or fails its checksum (checked when a
    # loader first opens it): `error` stops the run naming it; `skip` leaves it out, said once.
    on_bad_shard: Literal["error", "skip"] = "error"
    shuffle_buffer: int = 256
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def shard_sets(self) -> tuple[MixtureEntry, ...]:
        """The shard sets to train on; the check that there is one waits until data is read,
        so a config without data still builds models."""
        if not (self.mixture or self.shards):
            raise ConfigError(
                "no shard set given: set data.shards=PATH (a folder from `usjepa shards build`) "
                "or list shard sets in data.mixture"
            )
        return self.mixture or (MixtureEntry(self.shards),)


@dataclass
class MaskConfig:
    num_context: int = 1
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.075, 0.125)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    min_keep: int = 10  # patches every block keeps, else it is resampled
    max_tries: int = 50  # resampling attempts per block before the constraint is relaxed
    # USrc-JEPA: blocks are intersected with the patches that hold ultrasound signal.
    region_conditioned: bool = False
    region_min_pixels: int = 1  # region pixels a patch needs to count as valid
    # I-JEPA's collation: cut every mask of the global batch to the shortest one. Off: each
    # sample keeps every patch it drew (padded, with attention key masks). For comparison only.
    truncate_to_shortest: bool = False


@dataclass
class ModelConfig:
    """The student encoder (a ViT on single-channel images)."""

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    # Attention kernel for student, predictor and teacher alike. xformers' memory-efficient
    # kernel saves memory on large CUDA runs but is optional and CUDA-only, so `auto` uses it
    # only when it imports and passes a start-up check against SDPA, else falls back to sdpa
    # (and says why); an explicit `xformers` that cannot run is an error. `matmul` spells
    # attention out as matmuls + softmax: `auto` takes it on the CPU in bf16, where it beats the
    # fused kernel at ViT lengths. Weights are the same whichever runs.
    attention: Literal["auto", "sdpa", "xformers", "matmul"] = "auto"
    # Initial weights of the encoder and the predictor (or MAE decoder), timm's schemes:
    # `timm` draws linear weights from a truncated normal of std 0.02 (timm's default, I-JEPA);
    # `jax` uses Xavier-uniform linears and a LeCun-normal patch embedding (MAE, big_vision),
    # which at small widths gives larger attention logits from the first step.
    init: Literal["timm", "jax"] = "timm"


@dataclass
class PredictorConfig:
    depth: int = 12
    embed_dim: int = 384
    num_heads: int = 12
    # per_block: one pass per target block over context + that block's mask tokens (I-JEPA;
    # the context is repeated per block). shared_context: one pass over the context and all
    # blocks, each block's mask tokens attending to the context and their own block only
    # (the context attends to itself), so blocks still cannot see each other. The default,
    # shared_context, was chosen on val (README, "Predictor layout"): as good or better at
    # about 30% fewer FLOPs per step.
    layout: Literal["per_block", "shared_context"] = "shared_context"


@dataclass
class TeacherConfig:
    # A stage-1 run dir, a timm-style ViT state dict (.pth/.pt/.safetensors), or `none`
    # (a randomly initialised frozen teacher, for smoke tests).
    checkpoint: str = "none"
    # Architecture of a state-dict teacher (depth and width are read from the weights; heads
    # are not stored in them) or of the random teacher. 0 = same as the student.
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device supports it
    # Per-channel mean and std (of [0, 1] pixels) the state-dict teacher was trained with,
    # e.g. ImageNet's [0.485, 0.456, 0.406] / [0.229, 0.224, 0.225]: folded into its patch
    # embedding, so it sees a gray image as it saw its training images. Empty: the
    # checkpoint's own (`config.json` of timm's hub layout, `open_clip_config.json`) where it
    # has one, else this project's 0.5 / 0.5 (what a stage-1 run dir teacher was trained on).
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # LayerNorm (no affine) over the feature dim of the target latents, the frozen teacher's
    # and the EMA target's alike, as I-JEPA's code does (the SALT papers do not say; see
    # docs/method.md#choices-where-the-paper-is-silent).
    layernorm_targets: bool = True


@dataclass
class TrainConfig:
    # mae: stage 1, pixels of the target blocks; salt: stage 2, latents of the frozen teacher;
    # ema: the I-JEPA baseline, latents of an exponential moving average of the student encoder.
    objective: Literal["mae", "salt", "ema"] = "salt"
    # ema: momentum of the target encoder, linear from the first to the second value over
    # train.total_steps (I-JEPA: 0.996 -> 1.0).
    ema_momentum: tuple[float, float] = (0.996, 1.0)
    total_steps: int = 1000
    loss: Literal["smooth_l1", "l1", "mse"] = "smooth_l1"
    smooth_l1_beta: float = 1.0
    norm_pix_targets: bool = True  # stage 1: per-patch normalised pixel targets
    precision: Literal["fp32", "bf16"] = "fp32"  # autocast dtype for student and predictor
    max_nonfinite: int = 5  # consecutive skipped steps (NaN/Inf loss or grad) before stopping
    # At every checkpoint, the loss on the `val` split (un-augmented, fixed masks) is logged as
    # val/loss and `checkpoints/best` names the lowest (docs/method.md#validation-and-model-selection).
    validate: bool = True
    # Batches validated at each checkpoint: -1 = sized to 5% of the steps between checkpoints
    # (a validation batch runs no backward, so it costs a few percent of the training time),
    # 0 = the whole split, N = the first N (the same ones every time).
    val_batches: int = -1
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory
    compile: bool = False  # torch.compile each transformer block (student and predictor)


@dataclass
class DistributedConfig:
    """Multi-process training (torchrun or Slurm); ignored in a single process."""

    # FSDP2 frees each block's gathered parameters after its forward and gathers them again for
    # the backward: less memory for one more all-gather per block.
    reshard_after_forward: bool = True
    # Gradients are reduced across ranks in this dtype. Parameters are computed in
    # train.precision and kept (sharded) in fp32 for the optimizer.
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    timeout_s: int = 600  # a collective that waits longer than this fails instead of hanging


@dataclass
class OptimConfig:
    lr: float = 5e-5  # peak, reached after warm-up
    start_lr: float = 5e-6
    final_lr: float = 5e-7
    warmup_steps: int = 100
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 1.0  # max grad norm; 0 turns clipping off


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3


@dataclass
class LogConfig:
    every_steps: int = 10
    image_every_steps: int = 200  # mask overlays in TensorBoard; 0 turns them off
    progress: bool = True  # tqdm bar on stderr
    # Peak TFLOP/s of one device for perf/mfu; 0 = the datasheet figure of a known GPU
    # (H100, H200, A100) or the measured one of the CPU (train/flops.py).
    peak_tflops: float = 0.0


@dataclass
class ProbeConfig:
    """Linear probe, kNN probe and the non-learned baselines (docs/method.md#probe-protocol)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_epochs: int = 150
    patience: int = 15  # early stopping on validation loss
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    standardize: bool = True  # z-score features with train statistics (linear and kNN probe)
    extract_batch_size: int = 64
    # kNN probe as in DINO: the k most cosine-similar train rows vote with weight exp(sim / T).
    knn_k: int = 20
    knn_temperature: float = 0.07
    pixels_size: int = 16  # backbone `pixels`: the image area-averaged to pixels_size^2 values
    histogram_bins: int = 32  # backbone `histogram`: in-region intensity histogram over [0, 1]


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    @property
    def val_batch_limit(self) -> int:
        """Validation batches per checkpoint (0 = all): `train.val_batches`, with -1 resolved to
        5% of the steps between checkpoints (at least 1)."""
        if self.train.val_batches >= 0:
            return self.train.val_batches
        return max(1, math.ceil(0.05 * self.checkpoint.every_steps))

    @property
    def grid_size(self) -> int:
        return self.data.image_size // self.model.patch_size


# --------------------------------------------------------------------------- validation


def require(ok: bool, key: str, why: str) -> None:
    """A typed spec's cross-field check: a SettingError naming the key unless `ok`."""
    if not ok:
        raise SettingError(key, why)


def _floats(value: Any, key: str) -> typing.Iterator[tuple[str, float]]:
    """(dotted key, value) of every float in a config value: fields, list entries, sections."""
    if isinstance(value, float):
        yield key, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _floats(v, f"{key}[{i}]")
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _floats(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)


def require_finite(spec: Any) -> None:
    """Every float setting of the dataclass `spec` is a finite number (YAML reads `nan`, `.inf`)."""
    for key, value in _floats(spec, ""):
        require(math.isfinite(value), key, f"{value} is not a finite number")


def validate(cfg: Config) -> Config:
    """Cross-field checks that single-field types cannot express."""
    # The order is the order of the messages: the first broken setting is the one named.
    require_finite(cfg)
    _check_architecture(cfg)
    _check_sampling_ranges(cfg.mask, cfg.data.augment)
    _check_masks(cfg)
    _check_data(cfg.data)
    _check_schedule(cfg)
    require(
        cfg.run.stop_at_step >= 0,
        "run.stop_at_step",
        f"must be >= 0 (0: run to train.total_steps), got {cfg.run.stop_at_step}",
    )
    require(
        cfg.run.device == "auto" or cfg.run.device == "cpu" or cfg.run.device.startswith("cuda"),
        "run.device",
        f"'{cfg.run.device}' is not one of auto, cpu, cuda, cuda:N",
    )
    _check_probe(cfg.probe)
    return cfg


def _check_architecture(cfg: Config) -> None:
    """Patches tile the image; heads divide the width of student, predictor and teacher."""
    m, d = cfg.model, cfg.data
    require(
        d.image_size % m.patch_size == 0,
        "data.image_size",
        f"{d.image_size} is not a multiple of model.patch_size={m.patch_size}",
    )
    for key, dim, heads in (
        ("model", m.embed_dim, m.num_heads),
        ("predictor", cfg.predictor.embed_dim, cfg.predictor.num_heads),
    ):
        divisible = heads > 0 and dim % heads == 0
        require(divisible, f"{key}.embed_dim", f"{dim} is not divisible by {key}.num_heads={heads}")
    t = cfg.teacher
    require(
        t.num_heads == 0 or (t.embed_dim or m.embed_dim) % t.num_heads == 0,
        "teacher.num_heads",
        "must divide the teacher's embed_dim",
    )


def _check_sampling_ranges(mk: MaskConfig, augment: AugmentConfig) -> None:
    """The (low, high) ranges that masks and crops are drawn from."""
    for key, (lo, hi), top in (
        ("mask.context_scale", mk.context_scale, 1.0),
        ("mask.target_scale", mk.target_scale, 1.0),
        ("data.augment.crop_scale", augment.crop_scale, 1.0),
    ):
        require(0 < lo <= hi <= top, key, f"needs 0 < low <= high <= {top}, got ({lo}, {hi})")
    for key, (lo, hi) in (("mask.context_aspect", mk.context_aspect), ("mask.target_aspect", mk.target_aspect)):
        require(0 < lo <= hi, key, f"needs 0 < low <= high, got ({lo}, {hi})")


def _check_masks(cfg: Config) -> None:
    mk = cfg.mask
    n_patches = cfg.grid_size**2
    require(
        0 < mk.min_keep < n_patches,
        "mask.min_keep",
        f"must be between 1 and the {n_patches} patches of a {cfg.data.image_size}px image",
    )
    require(mk.num_context == 1, "mask.num_context", "only one context block is supported")
    require(mk.num_targets >= 1, "mask.num_targets", "must be at least 1")


def _check_data(d: DataConfig) -> None:
    require(d.batch_size >= 1, "data.batch_size", "must be at least 1")
    require(
        not (d.shards and d.mixture),
        "data.shards",
        "name one shard set (data.shards=PATH) or several in data.mixture, not both",
    )
    require(
        all(e.weight >= 0 for e in d.mixture),
        "data.mixture",
        "weights must be >= 0 (0: the manifest's sampling_weight)",
    )
    require(
        d.streams >= 1 and d.batch_size % d.streams == 0,
        "data.streams",
        f"{d.streams} must be >= 1 and divide data.batch_size={d.batch_size} (each stream gives "
        "an equal chunk of the batch)",
    )
    require(d.micro_batch_size >= 0, "data.micro_batch_size", "must be >= 0 (0 = no gradient accumulation)")
    require(d.num_workers >= 0, "data.num_workers", "must be >= 0")


def _check_schedule(cfg: Config) -> None:
    """Steps, momenta, learning rates, and how often to checkpoint, validate and log."""
    t, o = cfg.train, cfg.optim
    require(t.total_steps >= 1, "train.total_steps", "must be at least 1")
    require(
        all(0 <= momentum <= 1 for momentum in t.ema_momentum),
        "train.ema_momentum",
        f"momenta must be in [0, 1], got {t.ema_momentum}",
    )
    require(cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be at least 1")
    require(
        t.val_batches >= -1,
        "train.val_batches",
        f"must be -1 (5% of the steps between checkpoints), 0 (all) or a count, got {t.val_batches}",
    )
    require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
    require(cfg.log.every_steps >= 1, "log.every_steps", "must be at least 1")
    require(cfg.log.peak_tflops >= 0, "log.peak_tflops", "must be >= 0 (0 = the device's known figure)")
    require(
        0 <= o.warmup_steps <= t.total_steps,
        "optim.warmup_steps",
        f"must be between 0 and train.total_steps={t.total_steps}",
    )
    for key, lr in (("optim.lr", o.lr), ("optim.start_lr", o.start_lr), ("optim.final_lr", o.final_lr)):
        require(lr >= 0, key, f"learning rates must be >= 0, got {lr:g}")


def _check_probe(p: ProbeConfig) -> None:
    require(len(p.seeds) >= 1, "probe.seeds", "needs at least one seed")
    require(p.knn_k >= 1, "probe.knn_k", f"must be at least 1, got {p.knn_k}")
    require(p.knn_temperature > 0, "probe.knn_temperature", f"must be > 0, got {p.knn_temperature}")
    require(p.pixels_size >= 1, "probe.pixels_size", f"must be at least 1, got {p.pixels_size}")
    require(p.histogram_bins >= 1, "probe.histogram_bins", f"must be at least 1, got {p.histogram_bins}")


# --------------------------------------------------------------------------- loading


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping (PyYAML would silently keep the last)."""

    def __init__(self, key: Any, first_line: int, second_line: int):
        super().__init__(problem=f"duplicate key '{key}'", problem_mark=None)
        self.key, self.first_line, self.second_line = key, first_line, second_line

    def __str__(self) -> str:
        return (
            f"key '{self.key}' is given twice in the same mapping, at lines {self.first_line} and "
            f"{self.second_line} (only the last would count); keep one"
        )


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, at any depth. Keys merged
    in from an anchor (`<<: *base`) may still be overridden by the mapping's own keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(key, first, line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> Any:
    """YAML text as Python values, as yaml.safe_load reads it, but a duplicate key is an error."""
    return yaml.load(text, Loader=StrictLoader)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists to tuples, int to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, args))}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = args
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `run.dir=2024` is a path, not a number
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown key '{prefix}{key}'{hint}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """An instance of the dataclass `cls` from a mapping, each value coerced to its field type; an
    unknown key is a ConfigError with the closest valid name (`where` prefixes the keys)."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, str(key), prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        names = ", ".join(f"'{prefix}{m}'" for m in missing)
        raise ConfigError(f"missing key {names}: it has no default, so it must be given")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any, schema: type | None = None) -> None:
    """Place `value` at `a.b.c` in a nested dict, checking each step against the schema (the
    run Config unless given); in a mapping-typed setting each part names an entry."""
    parts = dotted.split(".")
    cls: Any = schema or Config
    node = tree
    for i, part in enumerate(parts):
        if typing.get_origin(cls) is dict:  # an entry of a mapping, e.g. a study's arms.salt
            cls = typing.get_args(cls)[1]
        else:
            names = {f.name: f for f in dataclasses.fields(cls)}
            if part not in names:
                raise _unknown_key(cls, part, "".join(p + "." for p in parts[:i]))
            cls = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            _coerce(value, cls, dotted)  # a bad value fails here, blamed on the override
            node[part] = value
            return
        if not (dataclasses.is_dataclass(cls) or typing.get_origin(cls) is dict):
            raise ConfigError(f"'{dotted}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):  # the file gave a value where a section belongs
            raise _NotASection(f"{'.'.join(parts[: i + 1])}: expected a mapping of keys, got {node!r}")


class _NotASection(ConfigError):
    """A value in the file where an override needs a section: the file's mistake."""


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested settings under their dotted keys."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two nested settings dicts (a resolved
    config, a shard build's work fingerprint)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=1e-4` -> ('optim.lr', 0.0001). Values are read as YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.total_steps=100)")
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"override {text}: key '{e.key}' is given twice") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate. A
    value out of range is blamed on where it came from, as load_typed does for types."""
    cfg = load_typed(Config, path, overrides, example="configs/demo.yaml")
    try:
        return validate(cfg)
    except SettingError as e:
        raise blame(e, path, overrides) from None


def _sets(setting: str, key: str) -> bool:
    """Whether giving `setting` (a dotted key) gives `key` (`data.augment` gives
    `data.augment.hflip`, `optim.betas` gives `optim.betas[1]`)."""
    return key == setting or key.startswith((f"{setting}.", f"{setting}["))


def _in_file(path: str | os.PathLike, key: str) -> bool:
    """Whether the YAML file `path` (already read once) gives `key`."""
    try:
        node = _yaml_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    for part in key.split("."):
        part = part.split("[", 1)[0]
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def blame(e: SettingError, path: str | os.PathLike | None, overrides: typing.Sequence[str]) -> ConfigError:
    """`e` said where its key was set, as load_typed says it of a value of the wrong type:
    `override key=value: why` (the last override that set the key), `FILE: key: why` (the
    file set it), else `key: why` as it stands (a default, or no file to tell apart)."""
    if path is None:
        return e
    for text in reversed(overrides):
        setting, _ = parse_override(text)
        if _sets(setting, e.key):
            return ConfigError(f"override {text}: {e.why}")
    if _in_file(path, e.key):
        return ConfigError(f"{path}: {e.key}: {e.why}")
    return e


def load_typed(
    schema: type, path: str | os.PathLike | None, overrides: typing.Sequence[str] = (), example: str = ""
) -> Any:
    """An instance of the dataclass `schema` from a YAML file (or its defaults when `path` is
    None) with dotted overrides applied, strictly typed (no cross-field checks). A bad value is
    blamed on where it came from: `FILE: key: ...` or, with a file, `override key=value: ...`."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found; pass a YAML file such as {example}")
        try:
            tree = _yaml_load(p.read_text())
        except DuplicateKeyError as e:
            raise ConfigError(f"{p}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file '{p}' cannot be read: {e}") from None
        if tree is None:
            like = f", as in {example}" if example else ""
            raise ConfigError(
                f"config file '{p}' is empty; write the settings to change{like} ('{{}}' for all the defaults)"
            )
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (run:, data:, ...)")
    for text in overrides:
        key, value = parse_override(text)
        try:
            _set_dotted(tree, key, value, schema)
        except _NotASection as e:
            raise ConfigError(f"{path}: {e}") from None
        except ConfigError as e:
            if path is None:  # no file it could be mistaken for
                raise
            why = str(e).removeprefix(f"{key}: ")
            raise ConfigError(f"override {text}: {why}") from None
    try:  # every override's value has passed: what fails now came from the file
        return from_dict(schema, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML output."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def config_from_dict(tree: dict) -> Config:
    """A Config from a nested dict, e.g. a run's resolved_config.yaml."""
    return validate(from_dict(Config, tree))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
