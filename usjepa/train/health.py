"""Cheap signals of representation health and pictures of what the model is asked to do."""

from __future__ import annotations

import math

import torch
from torchvision.utils import make_grid

from usjepa.data.augment import PIXEL_MEAN, PIXEL_STD


def feature_std(features: torch.Tensor) -> float:
    """Std across samples of L2-normalised features [N, D] (e.g. mean-pooled tokens), averaged
    over dims.

    Collapse (every image mapped to one point) drives it to 0; features spread evenly over
    the sphere sit near 1/sqrt(D).
    """
    normed = torch.nn.functional.normalize(features.detach().float(), dim=-1)
    return normed.std(0).mean().item()


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of features [N, D] (RankMe, Garrido et al. 2023): exp of the entropy of
    the singular values normalised to sum 1. D equal singular values give D; dimensional
    collapse onto r directions gives about r, however large D is. The features are centred
    first (unlike the paper): mean-pooled ViT tokens share a large mean vector, which would
    otherwise count as the one dominant direction of every encoder. NaN for non-finite features."""
    if not torch.isfinite(features).all():
        return math.nan
    features = features.detach().double()
    singular = torch.linalg.svdvals(features - features.mean(0))
    p = singular / singular.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def mask_overlay(
    images: torch.Tensor, context: torch.Tensor, targets: torch.Tensor, patch: int, max_images: int = 8
) -> torch.Tensor:
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
