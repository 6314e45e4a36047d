"""Non-learned probe backbones: what the probes score from the image itself, so that an
encoder's margin over `random` can be read against the margin of plain pixels.

Each takes the model input [B, 1, H, W] (pixels p in [0, 1] as (p - 0.5) / 0.5, at the run's
data.image_size) and returns a single token [B, 1, D], so `extract_features` (which mean-pools
tokens) and the probes use them as they use an encoder. They have no parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usjepa.config import Config
from usjepa.data.augment import PIXEL_MEAN, PIXEL_STD
from usjepa.errors import UserError

BASELINES = ("pixels", "histogram")


class Pixels(torch.nn.Module):
    """The model input area-averaged (adaptive average pooling) to size x size: D = size^2."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.size).flatten(1).unsqueeze(1)


class Histogram(torch.nn.Module):
    """Normalised histogram of the in-region pixels in `bins` equal bins of [0, 1]: D = bins.

    Shards zero every pixel outside the ultrasound region, so the region is the pixels > 0;
    counting the zeros would make the histogram mostly measure the region's size. A sample
    with no such pixel gets an all-zero histogram."""

    def __init__(self, bins: int):
        super().__init__()
        self.bins = bins

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images * PIXEL_STD + PIXEL_MEAN).flatten(1)  # back to [0, 1]
        inside = (pixels > 0).float()
        index = (pixels * self.bins).long().clamp(0, self.bins - 1)  # p = 1 falls in the last bin
        counts = inside.new_zeros(pixels.shape[0], self.bins).scatter_add_(1, index, inside)
        return (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).unsqueeze(1)


def build_baseline(kind: str, cfg: Config) -> torch.nn.Module:
    """Baseline `kind` (one of BASELINES) with the run's probe settings."""
    if kind == "pixels":
        size, image = cfg.probe.pixels_size, cfg.data.image_size
        if size > image:
            raise UserError(
                f"probe.pixels_size={size} is larger than the run's data.image_size={image}; "
                f"pass probe.pixels_size={image} or less"
            )
        return Pixels(size)
    if kind == "histogram":
        return Histogram(cfg.probe.histogram_bins)
    raise UserError(f"unknown baseline '{kind}'; choose one of {', '.join(BASELINES)}")
