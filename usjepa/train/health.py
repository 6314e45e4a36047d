"""Cheap signals of representation health and pictures of what the model is asked to do."""

from __future__ import annotations

import torch
from torchvision.utils import make_grid

from usjepa.data.augment import PIXEL_MEAN, PIXEL_STD


def feature_std(tokens: torch.Tensor) -> float:
    """Std across the batch of mean-pooled, L2-normalised features, averaged over dims.

    Collapse (every image mapped to one point) drives it to 0; healthy features sit near
    1/sqrt(D).
    """
    pooled = torch.nn.functional.normalize(tokens.detach().float().mean(1), dim=-1)
    return pooled.std(0).mean().item()


def mask_overlay(images: torch.Tensor, context: torch.Tensor, targets: torch.Tensor, patch: int,
                 max_images: int = 8) -> torch.Tensor:
    """RGB grid [3, H', W'] (uint8): each input with its context patches tinted green and its
    target patches tinted red, for TensorBoard."""
    n = min(max_images, images.shape[0])
    gray = (images[:n].float() * PIXEL_STD + PIXEL_MEAN).clamp(0, 1)
    grid = gray.shape[-1] // patch
    tint = torch.zeros(n, 3, grid * grid)
    rows = torch.arange(n)
    tint[rows[:, None], 1, context[:n]] = 1.0
    for block in targets[:, :n]:
        tint[rows[:, None], 0, block] = 1.0
    tint = tint.reshape(n, 3, grid, grid).repeat_interleave(patch, -1).repeat_interleave(patch, -2)
    rgb = gray.expand(-1, 3, -1, -1)
    shaded = torch.where(tint.sum(1, keepdim=True) > 0, 0.6 * rgb + 0.4 * tint, rgb)
    zoom = max(1, 192 // shaded.shape[-1])  # small training images stay legible in TensorBoard
    shaded = shaded.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
    return (make_grid(shaded, nrow=min(n, 4), padding=2) * 255).to(torch.uint8)
