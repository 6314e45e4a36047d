"""One way to load an encoder (this project's `Encoder`) from wherever its weights are:

- a run dir (`usjepa train`): its student encoder, or the EMA target of an EMA run, at the
  checkpoint `best`, `latest` or `step_N` names;
- an export folder (`usjepa export`): `config.json` for the architecture, `encoder.safetensors`;
- a state-dict file in timm's ViT layout (.pth / .pt / .bin / .safetensors): the input
  normalisation it was trained with and its RGB channels are folded into a one-channel patch
  embedding (so a gray image reaches its first layer exactly as the gray image repeated on R,
  G, B and normalised with its own mean/std would), the position embedding is resampled to
  our grid.

The teacher, the probes, export and the bench all call `load_encoder`; `read_checkpoint` is
the one reader of checkpoint files (the bench's loaders of other architectures use it too).
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from usjepa import rundir
from usjepa.config import Config
from usjepa.data.augment import PIXEL_MEAN, PIXEL_STD
from usjepa.errors import UserError
from usjepa.fileio import files_sha256
from usjepa.models.vit import Encoder, build_encoder

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
EXPORT_WEIGHTS = "encoder.safetensors"
EXPORT_CONFIG = "config.json"
RUN_ENCODERS = ("student", "target")
_WRAPPERS = ("model", "state_dict", "module", "teacher", "encoder")
# `module.` first: DDP wraps whatever the training code called its parts.
_PREFIXES = ("module.", "backbone.", "encoder.")


@dataclass
class LoadedEncoder:
    encoder: Encoder
    kind: str  # run | export | file
    path: Path
    sha256: str  # of the files the weights were read from
    step: int | None = None
    checkpoint: str = ""  # the step dir of a run
    config: Config | None = None  # a run's config
    export_config: dict = field(default_factory=dict)  # an export's config.json
    mean: tuple[float, ...] = (PIXEL_MEAN,)  # the input normalisation folded into the patch embedding
    std: tuple[float, ...] = (PIXEL_STD,)


def is_export(path: Path) -> bool:
    return (Path(path) / EXPORT_CONFIG).is_file() and (Path(path) / EXPORT_WEIGHTS).is_file()


# --------------------------------------------------------------------------- checkpoint files
def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


def _unwrap(obj: object) -> dict[str, torch.Tensor]:
    """The tensors of the state dict inside a training checkpoint's common wrappers."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = strip_prefix(sd, prefix)
    return sd


def _recorded_step(obj: object) -> int | None:
    if not isinstance(obj, dict):
        return None
    step = next((obj[k] for k in ("step", "global_step") if k in obj), None)
    return int(step) if isinstance(step, (int, str)) and str(step).isdigit() else None


def _load_file(path: Path) -> object:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            # A `usjepa export` records its step in the metadata.
            return {"state_dict": {k: f.get_tensor(k) for k in f.keys()}, **(f.metadata() or {})}
    # MAE-style training checkpoints pickle their argparse settings beside the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The state dict in checkpoint file `path` and the step it records (else None)."""
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise UserError(
            f"{path}: not a checkpoint file ({', '.join(STATE_DICT_SUFFIXES)}); pass the weights file itself"
        )
    try:
        obj = _load_file(path)
    except pickle.UnpicklingError as e:
        # A dotted name: bytes that merely look like a GLOBAL opcode name no class.
        found = re.search(r"Unsupported global: GLOBAL (\w+(?:\.\w+)+)", str(e))
        if not found:
            raise UserError(
                f"{path}: not a readable checkpoint (not a torch pickle); is the file complete and "
                "a torch or safetensors file?"
            ) from None
        raise UserError(
            f"{path}: pickles a {found.group(1)}, which a weights-only load refuses; if you trust the "
            "file, re-save its state dict: torch.save(torch.load(F, weights_only=False)['model'], "
            "'weights.pth')"
        ) from None
    # The weights-only unpickler fails on arbitrary bytes with whatever error its stack hits.
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(
            f"{path}: not a readable checkpoint ({why}); is the file complete and a torch or safetensors file?"
        ) from None
    sd = _unwrap(obj)
    if not sd:
        raise UserError(
            f"{path}: holds no state dict (no tensors found, also not under "
            f"{', '.join(_WRAPPERS)}); save one with torch.save(model.state_dict(), F)"
        )
    return sd, _recorded_step(obj)


def recorded_heads(path: Path) -> int:
    """The head count a `usjepa export` (or any safetensors file with timm `model_args`
    metadata) recorded, else 0."""
    if path.suffix != ".safetensors":
        return 0
    with safe_open(str(path), "pt") as f:
        args = (f.metadata() or {}).get("model_args")
    return int(json.loads(args).get("num_heads", 0)) if args else 0


def recorded_normalisation(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from the config a checkpoint file ships with: timm's hub `config.json`
    (`pretrained_cfg`), or open_clip's `open_clip_config.json` (`preprocess_cfg`); else None."""
    for name, section in (("config.json", "pretrained_cfg"), ("open_clip_config.json", "preprocess_cfg")):
        config = path.with_name(name)
        if not config.is_file():
            continue
        try:
            fields = json.loads(config.read_text()).get(section) or {}
        except (json.JSONDecodeError, AttributeError) as e:
            raise UserError(
                f"{config}: not a readable {name} ({e}); fix or remove it, or set teacher.mean and teacher.std"
            ) from None
        if "mean" in fields and "std" in fields:
            return tuple(map(float, fields["mean"])), tuple(map(float, fields["std"]))
    return None


def check_normalisation(
    mean: tuple[float, ...], std: tuple[float, ...], channels: int, where: str, key: str = ""
) -> None:
    """A per-channel input normalisation for an encoder with `channels` inputs (`where`), set
    as `{key}mean` / `{key}std`: both or neither, 1 or `channels` values, every std > 0."""
    if bool(mean) != bool(std):
        raise UserError(f"{key}mean and {key}std go together: set both (one value per input channel) or neither")
    for name, values in (("mean", mean), ("std", std)):
        if values and len(values) not in (1, channels):
            raise UserError(
                f"{key}{name}={list(values)}: {where} has {channels} input channels; give 1 or {channels} values"
            )
    if std and min(std) <= 0:
        raise UserError(f"{key}std={list(std)}: every std must be > 0")


def fold_input_normalisation(
    weight: torch.Tensor, bias: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch embedding (weight [D, C, p, p], bias [D]) trained on C channels normalised with
    (mean, std), rewritten for one channel normalised as ours ((x - PIXEL_MEAN) / PIXEL_STD).

    A gray pixel g reaches channel c as (g - mean_c) / std_c, and our input is
    x = (g - PIXEL_MEAN) / PIXEL_STD, so channel c sees (PIXEL_STD / std_c) x +
    (PIXEL_MEAN - mean_c) / std_c: a scale of the weights and a constant that the patch
    projection (no padding) turns into a bias.
    """
    channels = weight.shape[1]
    mean_t, std_t = (torch.tensor(v, dtype=torch.float64).expand(channels) for v in (mean, std))
    w = weight.double()
    scale, shift = PIXEL_STD / std_t, (PIXEL_MEAN - mean_t) / std_t
    folded = (w * scale[None, :, None, None]).sum(1, keepdim=True)
    folded_bias = bias.double() + (w.sum((2, 3)) * shift[None]).sum(1)
    return folded.to(weight.dtype), folded_bias.to(bias.dtype)


def _file_normalisation(
    mean: Sequence[float], std: Sequence[float], path: Path, channels: int, key: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The setting's normalisation, else the one the file ships with, else ours."""
    check_normalisation(tuple(mean), tuple(std), channels, str(path), key=key)
    mean, std = (mean, std) if mean else (recorded_normalisation(path) or ((PIXEL_MEAN,), (PIXEL_STD,)))
    check_normalisation(tuple(mean), tuple(std), channels, str(path), key=key)
    return tuple(mean), tuple(std)


@dataclass(frozen=True)
class _TimmViTGeometry:
    """The architecture a timm ViT state dict implies (heads excepted: they are not in it)."""

    width: int
    depth: int
    class_token: bool
    reg_tokens: int
    prefix_tokens: int  # class and register tokens
    pos_grid: int  # side of the patch grid of the stored position embedding
    no_embed_class: bool  # timm's: the position table holds only patch positions


def _timm_vit_geometry(sd: dict[str, torch.Tensor], patch_size: int, source: str) -> _TimmViTGeometry:
    width, _, p, _ = sd["patch_embed.proj.weight"].shape
    if p != patch_size:
        raise UserError(
            f"{source}: patch size {p} != model.patch_size {patch_size}; "
            "the student must use the teacher's patch size so token positions align"
        )
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    reg_tokens = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    class_token = "cls_token" in sd
    n_prefix = int(class_token) + reg_tokens
    # timm's no_embed_class: the table holds only patch positions although prefix tokens exist.
    old_tokens = sd["pos_embed"].shape[1]
    old_grid = int(round((old_tokens - n_prefix) ** 0.5))
    no_embed_class = n_prefix > 0 and old_grid * old_grid == old_tokens
    if no_embed_class:
        old_grid = int(round(old_tokens**0.5))
    return _TimmViTGeometry(width, depth, class_token, reg_tokens, n_prefix, old_grid, no_embed_class)


def encoder_from_state_dict(
    sd: dict[str, torch.Tensor],
    image_size: int,
    patch_size: int,
    source: str,
    attention: str = "sdpa",
    num_heads: int = 0,
    mean: tuple[float, ...] = (PIXEL_MEAN,),
    std: tuple[float, ...] = (PIXEL_STD,),
    key: str = "teacher.",
) -> Encoder:
    """Build a single-channel Encoder that matches a timm ViT state dict and load it, its
    training normalisation (`mean`, `std` per input channel) folded into the patch embedding.
    `num_heads` 0: timm's 64 channels per head (heads are not in the weights)."""
    geometry = _timm_vit_geometry(sd, patch_size, source)
    heads = num_heads or max(1, geometry.width // 64)
    encoder = Encoder(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=geometry.width,
        depth=geometry.depth,
        num_heads=heads,
        class_token=geometry.class_token,
        reg_tokens=geometry.reg_tokens,
        no_embed_class=geometry.no_embed_class,
        fixed_pos_embed=False,
        attention=attention,
    )
    if "norm.weight" not in sd:  # e.g. MAE/BEiT checkpoints that pool through fc_norm instead
        encoder.norm = nn.Identity()
    sd = _single_channel_state_dict(sd, geometry, image_size // patch_size, mean, std)
    wanted = encoder.state_dict()
    missing = sorted(set(wanted) - set(sd))
    if missing:
        raise UserError(
            f"{source}: the weights lack {len(missing)} encoder entries (first: {missing[0]}); "
            "is it a ViT with timm parameter names?"
        )
    try:
        encoder.load_state_dict({k: sd[k] for k in wanted})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{source}: the weights do not fit ({key}num_heads={heads}?): {first}") from None
    return encoder


def _single_channel_state_dict(
    sd: dict[str, torch.Tensor],
    geometry: _TimmViTGeometry,
    grid: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, torch.Tensor]:
    """A copy of `sd` for our encoder: the patch embedding folded to one channel normalised as
    ours, the position embedding resampled to a `grid` x `grid` patch grid."""
    sd = dict(sd)
    if "patch_embed.proj.bias" in sd:  # else the load names it as missing
        sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = fold_input_normalisation(
            sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], mean, std
        )
    if geometry.pos_grid != grid:
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"],
            new_size=[grid, grid],
            old_size=[geometry.pos_grid, geometry.pos_grid],
            num_prefix_tokens=0 if geometry.no_embed_class else geometry.prefix_tokens,
        )
    return sd


# --------------------------------------------------------------------------- the three sources
def _from_run(path: Path, which: str, checkpoint: str, image_size: int | None, attention: str) -> LoadedEncoder:
    if which not in RUN_ENCODERS:
        raise UserError(f"unknown run encoder '{which}'; choose one of {', '.join(RUN_ENCODERS)}")
    cfg = rundir.run_config(path)
    if which == "target" and cfg.train.objective != "ema":
        raise UserError(
            f"{path} is a {cfg.train.objective} run: only an EMA run (train.objective=ema) has a "
            "target encoder; use its student"
        )
    step_dir = rundir.find_checkpoint(path, checkpoint)
    encoder = build_encoder(cfg.model, image_size or cfg.data.image_size, attention=attention)
    if which == "student":
        rundir.load_module_weights(step_dir, encoder, prefix="encoder.")
    else:
        rundir.load_module_weights(step_dir, encoder, prefix="", key="target")
    digest = files_sha256([p for p in step_dir.iterdir() if p.is_file() and p.name != rundir.META])
    return LoadedEncoder(encoder, "run", path, digest, rundir.read_meta(step_dir)["step"], step_dir.name, cfg)


def _from_export(path: Path, image_size: int | None, attention: str) -> LoadedEncoder:
    config = json.loads((path / EXPORT_CONFIG).read_text())
    args = config["model_args"]
    if image_size not in (None, args["img_size"]):
        raise UserError(
            f"export {path} takes {args['img_size']} px images, not {image_size}; use a run of "
            f"data.image_size={args['img_size']}, or pass {path / EXPORT_WEIGHTS} to resample its "
            "position embedding"
        )
    encoder = Encoder(
        img_size=args["img_size"],
        patch_size=args["patch_size"],
        embed_dim=args["embed_dim"],
        depth=args["depth"],
        num_heads=args["num_heads"],
        mlp_ratio=args["mlp_ratio"],
        attention=attention,
    )
    encoder.load_state_dict(load_file(str(path / EXPORT_WEIGHTS)))
    step = config.get("usjepa", {}).get("step")
    return LoadedEncoder(encoder, "export", path, files_sha256([path / EXPORT_WEIGHTS]), step, export_config=config)


def _from_file(
    path: Path,
    image_size: int,
    patch_size: int,
    attention: str,
    num_heads: int,
    mean: Sequence[float],
    std: Sequence[float],
    key: str,
) -> LoadedEncoder:
    sd, step = read_checkpoint(path)
    if "patch_embed.proj.weight" not in sd:
        raise UserError(
            f"{path}: not a timm-style ViT state dict (no 'patch_embed.proj.weight'); "
            "export one with model.state_dict() from a timm VisionTransformer"
        )
    mean, std = _file_normalisation(mean, std, path, sd["patch_embed.proj.weight"].shape[1], key)
    encoder = encoder_from_state_dict(
        sd, image_size, patch_size, str(path), attention, num_heads or recorded_heads(path), mean, std, key
    )
    return LoadedEncoder(encoder, "file", path, files_sha256([path]), step, mean=mean, std=std)


def load_encoder(
    source: str | Path,
    *,
    which: str = "student",
    checkpoint: str = "latest",
    image_size: int | None = None,
    patch_size: int | None = None,
    attention: str = "sdpa",
    num_heads: int = 0,
    mean: Sequence[float] = (),
    std: Sequence[float] = (),
    key: str = "",
) -> LoadedEncoder:
    """The encoder at `source` (a run dir, an export folder or a state-dict file), on the CPU in
    fp32, and where it came from.

    Run dirs take `which` (student or target) and `checkpoint` (best, latest or step_N) and
    build at `image_size` (default: the run's); an export refuses another `image_size` than its
    own. State-dict files need `image_size` and
    `patch_size`; `num_heads`, `mean` and `std` override what the file records, and `key` is
    the settings prefix that errors name (e.g. "teacher.")."""
    path = Path(source).expanduser()
    if rundir.is_run_dir(path):
        return _from_run(path, which, checkpoint, image_size, attention)
    if is_export(path):
        return _from_export(path, image_size, attention)
    if path.is_file() and path.suffix in STATE_DICT_SUFFIXES:
        if image_size is None or patch_size is None:
            raise ValueError("loading a state-dict file needs image_size and patch_size")
        return _from_file(path, image_size, patch_size, attention, num_heads, mean, std, key)
    raise UserError(
        f"{key}checkpoint={source}: not a run dir (with {rundir.RESOLVED_CONFIG}), an export folder "
        f"({EXPORT_CONFIG} + {EXPORT_WEIGHTS}) nor a state-dict file ({', '.join(STATE_DICT_SUFFIXES)})"
    )
