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
