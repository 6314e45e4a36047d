"""The frozen teacher: loaded once, eval mode, no gradients, bf16 where the device has it.

Sources (`teacher.checkpoint`): a stage-1 run dir (`usjepa train` with train.objective=mae:
its encoder at `latest`), an export folder, or a timm-style ViT state-dict file, all read by
`models.loading.load_encoder`; or `none`, a randomly initialised frozen encoder (smoke tests only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from usjepa.config import Config, ModelConfig
from usjepa.data.augment import PIXEL_MEAN, PIXEL_STD
from usjepa.errors import UserError
from usjepa.models.attention import resolve_backend
from usjepa.models.loading import load_encoder
from usjepa.models.vit import Encoder, build_encoder

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
            raise UserError(
                f"teacher.dtype=bf16: {torch.cuda.get_device_name(device)} has no bf16; use teacher.dtype=fp32"
            )
        return torch.float32
    return torch.bfloat16


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
        arch = ModelConfig(
            patch_size=patch_size,
            embed_dim=t.embed_dim or cfg.model.embed_dim,
            depth=t.depth or cfg.model.depth,
            num_heads=t.num_heads or cfg.model.num_heads,
        )
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed + 1)
            encoder, digest = build_encoder(arch, image_size, attention=attention), ""
    else:
        loaded = load_encoder(
            source,
            checkpoint="latest",
            image_size=image_size,
            patch_size=patch_size,
            attention=attention,
            num_heads=t.num_heads,
            mean=t.mean,
            std=t.std,
            key="teacher.",
        )
        if loaded.kind != "file" and (t.mean or t.std):
            raise UserError(
                f"teacher.mean/std: teacher {source} was trained by this project on its own input "
                "normalisation; unset teacher.mean and teacher.std"
            )
        patch = loaded.encoder.patch_embed.patch_size[0]
        if patch != patch_size:
            raise UserError(
                f"teacher {source} uses patch size {patch}, the student {patch_size}: set model.patch_size={patch}"
            )
        encoder, digest, mean, std = loaded.encoder, loaded.sha256, loaded.mean, loaded.std
        source = str(loaded.path.resolve())
    encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return encoder, TeacherInfo(
        source=source,
        sha256=digest,
        embed_dim=encoder.embed_dim,
        dtype=str(dtype).removeprefix("torch."),
        mean=mean,
        std=std,
        final_norm=not isinstance(encoder.norm, nn.Identity),
    )
