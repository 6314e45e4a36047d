"""The frozen teacher: loaded once, eval mode, no gradients, bf16 where the device has it.

Sources (`teacher.checkpoint`):
- a stage-1 run dir (`usjepa train` with train.objective=mae): its encoder at `latest`;
- a timm-style ViT state dict (.pth / .pt / .bin / .safetensors): the input normalisation it
  was trained with and its RGB channels are folded into a one-channel patch embedding (so a
  gray image reaches its first layer exactly as the gray image repeated on R, G, B and
  normalised with its own mean/std would), the position embedding is resampled to our grid;
- `none`: a randomly initialised frozen encoder (smoke tests only).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from timm.layers import resample_abs_pos_embed
from torch import nn

from usjepa.config import Config, ModelConfig, TeacherConfig, config_from_dict
from usjepa.data.augment import PIXEL_MEAN, PIXEL_STD
from usjepa.errors import UserError
from usjepa.fileio import files_sha256
from usjepa.models.attention import resolve_backend
from usjepa.models.vit import Encoder, build_encoder
from usjepa.train import checkpoint as ckpt

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class TeacherInfo:
    source: str  # what teacher.checkpoint named, resolved
    sha256: str  # of the weights file(s); "" for a random teacher
    embed_dim: int
    dtype: str
    mean: tuple[float, ...] = (PIXEL_MEAN,)  # the input normalisation folded into its patch embedding
    std: tuple[float, ...] = (PIXEL_STD,)
    final_norm: bool = True  # False: its tokens leave the last block without a LayerNorm

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def teacher_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "fp32":
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if setting == "bf16":
            raise UserError(f"teacher.dtype=bf16: {torch.cuda.get_device_name(device)} has no bf16; use teacher.dtype=fp32")
        return torch.float32
    return torch.bfloat16


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher", "encoder"):  # common wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or "patch_embed.proj.weight" not in sd:
        raise UserError(f"{path}: not a timm-style ViT state dict (no 'patch_embed.proj.weight'); "
                        "export one with model.state_dict() from a timm VisionTransformer")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def recorded_heads(path: Path) -> int:
    """The head count a `usjepa export` (or any safetensors file with timm `model_args`
    metadata) recorded, else 0."""
    if path.suffix != ".safetensors":
        return 0
    from safetensors import safe_open
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
            raise UserError(f"{config}: not a readable {name} ({e}); fix or remove it, or set teacher.mean "
                            "and teacher.std") from None
        if "mean" in fields and "std" in fields:
            return tuple(map(float, fields["mean"])), tuple(map(float, fields["std"]))
    return None


def fold_input_normalisation(weight: torch.Tensor, bias: torch.Tensor, mean: tuple[float, ...],
                             std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
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


def check_normalisation(mean: tuple[float, ...], std: tuple[float, ...], channels: int, where: str,
                        key: str = "") -> None:
    """A per-channel input normalisation for an encoder with `channels` inputs (`where`), set
    as `{key}mean` / `{key}std`: both or neither, 1 or `channels` values, every std > 0."""
    if bool(mean) != bool(std):
        raise UserError(f"{key}mean and {key}std go together: set both (one value per input channel) or neither")
    for name, values in (("mean", mean), ("std", std)):
        if values and len(values) not in (1, channels):
            raise UserError(f"{key}{name}={list(values)}: {where} has {channels} input channels; give 1 or "
                            f"{channels} values")
    if std and min(std) <= 0:
        raise UserError(f"{key}std={list(std)}: every std must be > 0")


def _normalisation(cfg: TeacherConfig, path: Path, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    check_normalisation(cfg.mean, cfg.std, channels, str(path), key="teacher.")
    mean, std = (cfg.mean, cfg.std) if cfg.mean else (recorded_normalisation(path) or ((PIXEL_MEAN,), (PIXEL_STD,)))
    check_normalisation(mean, std, channels, str(path), key="teacher.")
    return tuple(mean), tuple(std)


def encoder_from_state_dict(sd: dict[str, torch.Tensor], cfg: TeacherConfig, image_size: int,
                            patch_size: int, source: str, attention: str = "sdpa",
                            recorded_heads: int = 0, mean: tuple[float, ...] = (PIXEL_MEAN,),
                            std: tuple[float, ...] = (PIXEL_STD,)) -> Encoder:
    """Build a single-channel Encoder that matches a timm ViT state dict and load it, its
    training normalisation (`mean`, `std` per input channel) folded into the patch embedding."""
    width, in_chans, p, _ = sd["patch_embed.proj.weight"].shape
    if p != patch_size:
        raise UserError(f"{source}: teacher patch size {p} != model.patch_size {patch_size}; "
                        "the student must use the teacher's patch size so token positions align")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    # Heads are not in the weights: the setting, else what an export recorded, else timm's 64 per head.
    heads = cfg.num_heads or recorded_heads or max(1, width // 64)
    reg_tokens = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    class_token = "cls_token" in sd
    n_prefix = int(class_token) + reg_tokens
    grid = image_size // patch_size
    # timm's no_embed_class: the table holds only patch positions although prefix tokens exist.
    old_tokens = sd["pos_embed"].shape[1]
    old_grid = int(round((old_tokens - n_prefix) ** 0.5))
    no_embed_class = n_prefix > 0 and old_grid * old_grid == old_tokens
    if no_embed_class:
        old_grid = int(round(old_tokens ** 0.5))
    encoder = Encoder(img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
                      num_heads=heads, class_token=class_token, reg_tokens=reg_tokens,
                      no_embed_class=no_embed_class, fixed_pos_embed=False, attention=attention)
    sd = dict(sd)
    if "patch_embed.proj.bias" in sd:  # else the check below names it
        sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = fold_input_normalisation(
            sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], mean, std)
    if "norm.weight" not in sd:  # e.g. MAE/BEiT checkpoints that pool through fc_norm instead
        encoder.norm = nn.Identity()
    if old_grid != grid:
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=[grid, grid],
                                                 old_size=[old_grid, old_grid],
                                                 num_prefix_tokens=0 if no_embed_class else n_prefix)
    wanted = encoder.state_dict()
    missing = sorted(set(wanted) - set(sd))
    if missing:
        raise UserError(f"{source}: teacher weights lack {len(missing)} encoder entries (first: {missing[0]}); "
                        "is it a ViT with timm parameter names?")
    try:
        encoder.load_state_dict({k: sd[k] for k in wanted})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{source}: teacher weights do not fit (teacher.num_heads={heads}?): {first}") from None
    return encoder


def _from_run_dir(run_dir: Path, image_size: int, patch_size: int, attention: str) -> tuple[Encoder, str]:
    stage1 = config_from_dict(yaml.safe_load((run_dir / "resolved_config.yaml").read_text()))
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise UserError(f"teacher.checkpoint={run_dir}: the run has no checkpoint yet; train it first "
                        f"(usjepa train ... run.dir={run_dir})")
    if stage1.model.patch_size != patch_size:
        raise UserError(f"teacher run {run_dir} uses patch size {stage1.model.patch_size}, "
                        f"the student {patch_size}: set model.patch_size={stage1.model.patch_size}")
    encoder = build_encoder(stage1.model, image_size, attention=attention)
    ckpt.load_module_weights(path, encoder, prefix="encoder.")
    return encoder, files_sha256([p for p in path.iterdir() if p.is_file() and p.name != ckpt.META])


def load_teacher(cfg: Config, device: torch.device) -> tuple[Encoder, TeacherInfo]:
    """The frozen teacher for `cfg`, on `device`, and what identifies it."""
    t = cfg.teacher
    image_size, patch_size = cfg.data.image_size, cfg.model.patch_size
    source = t.checkpoint
    dtype = teacher_dtype(t.dtype, device)
    mean, std = (PIXEL_MEAN,), (PIXEL_STD,)
    # The teacher runs in its own dtype (often bf16) on its device: resolve the kernel for that.
    attention = resolve_backend(cfg.model.attention, device, dtype)
    if source.lower() == "none":
        arch = ModelConfig(patch_size=patch_size, embed_dim=t.embed_dim or cfg.model.embed_dim,
                           depth=t.depth or cfg.model.depth, num_heads=t.num_heads or cfg.model.num_heads)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed + 1)
            encoder, digest = build_encoder(arch, image_size, attention=attention), ""
    else:
        path = Path(source).expanduser()
        if path.is_dir() and (path / "resolved_config.yaml").is_file():
            if t.mean or t.std:
                raise UserError(f"teacher.mean/std: teacher {path} is a stage-1 run, trained on this project's "
                                "input normalisation; unset teacher.mean and teacher.std")
            encoder, digest = _from_run_dir(path, image_size, patch_size, attention)
        elif path.is_file() and path.suffix in STATE_DICT_SUFFIXES:
            sd = _read_state_dict(path)
            mean, std = _normalisation(t, path, sd["patch_embed.proj.weight"].shape[1])
            encoder = encoder_from_state_dict(sd, t, image_size, patch_size, str(path), attention,
                                              recorded_heads(path), mean, std)
            digest = files_sha256([path])
        else:
            raise UserError(f"teacher.checkpoint={source}: not a stage-1 run dir (with resolved_config.yaml) "
                            f"nor a state-dict file ({', '.join(STATE_DICT_SUFFIXES)}); use `none` for a random teacher")
        source = str(path.resolve())
    encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return encoder, TeacherInfo(source=source, sha256=digest, embed_dim=encoder.embed_dim,
                                dtype=str(dtype).removeprefix("torch."), mean=mean, std=std,
                                final_norm=not isinstance(encoder.norm, nn.Identity))
