"""The training objectives, as functions of (batch, targets) -> loss.

Stage 1 (`mae`): the predictor decodes the pixels of the target blocks from the context,
against per-patch normalised targets. Stage 2 (`salt`): the predictor regresses the frozen
teacher's (optionally LayerNorm'd) last-layer latents at the target positions. The I-JEPA
baseline (`ema`) regresses the latents of an exponential moving average of the student's
encoder in the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usjepa.config import TrainConfig
from usjepa.models.vit import gather_tokens


def regression_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, n_targets: int, cfg: TrainConfig
) -> torch.Tensor:
    """The paper's loss (docs/method.md#objective): per target block the mean over its tokens
    and features, then the mean over the blocks of a sample, then over the samples.

    pred, target [T*B, Kt, F] (block-major); valid [T*B, Kt] excludes padding, so a block
    counts as one block whatever its size and however far it was padded (None: no padding).
    A block left empty (a scan region too small for it) does not count.
    """
    pred, target = pred.float(), target.float()
    if cfg.loss == "smooth_l1":
        per_token = F.smooth_l1_loss(pred, target, beta=cfg.smooth_l1_beta, reduction="none")
    elif cfg.loss == "l1":
        per_token = F.l1_loss(pred, target, reduction="none")
    else:
        per_token = F.mse_loss(pred, target, reduction="none")
    weight = torch.ones(pred.shape[:2], device=pred.device) if valid is None else valid.float()
    tokens = weight.sum(-1)
    per_block = ((per_token.mean(-1) * weight).sum(-1) / tokens.clamp(min=1)).reshape(n_targets, -1)
    blocks = (tokens > 0).float().reshape(n_targets, -1).sum(0)
    return (per_block.sum(0) / blocks.clamp(min=1)).mean()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 1, H, W] -> [B, N, patch*patch], patches in row-major order like the ViT's tokens."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def pixel_targets(images: torch.Tensor, patch: int, target_idx: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Pixels of the target patches [T*B, Kt, patch*patch], each patch z-scored when `normalize`."""
    patches = patchify(images.float(), patch)
    if normalize:
        mean = patches.mean(-1, keepdim=True)
        var = patches.var(-1, keepdim=True)
        patches = (patches - mean) / (var + 1e-6).sqrt()
    return gather_tokens(patches.repeat(target_idx.shape[0], 1, 1), target_idx.flatten(0, 1))


def latent_targets(latents: torch.Tensor, target_idx: torch.Tensor, layernorm: bool) -> torch.Tensor:
    """A target encoder's latents [B, N, D] (frozen teacher or EMA target, computed without
    gradient) at the target positions [T*B, Kt, D], float32, LayerNorm'd over D when asked."""
    latents = latents.float()
    if layernorm:
        latents = F.layer_norm(latents, latents.shape[-1:])
    return gather_tokens(latents.repeat(target_idx.shape[0], 1, 1), target_idx.flatten(0, 1))
