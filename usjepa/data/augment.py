"""The paper's augmentations (docs/method.md#augmentations), driven by an explicit generator.

Every random choice comes from the numpy Generator passed in, never from global RNG state,
so a sample's augmentation is a pure function of (seed, stream, step, sample) and a resumed
run sees exactly the views the uninterrupted run would have seen.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from usjepa.config import AugmentConfig

# Model inputs are pixels in [0, 1] mapped to [-1, 1]; one constant pair for every path.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> normalised model input."""
    return (pixels - PIXEL_MEAN) / PIXEL_STD


def crop_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: area fraction in `scale`, w/h in `ratio`.

    Same rule as torchvision's RandomResizedCrop (10 tries, then a centre crop), but seeded.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """torchvision's `gaussian_blur` (kernel 2*ceil(3 sigma)+1, reflect padding) on [C, H, W],
    as one pass per axis of shifted, weighted sums: the same result, and on CPU about twice
    as fast as its 2-D convolution (one-channel convolutions are slow there, even separable)."""
    k = 2 * math.ceil(3 * sigma) + 1
    x = torch.linspace(-(k // 2), k // 2, k)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    weights = (kernel / kernel.sum()).tolist()
    out = pixels
    for dim, padding in ((-2, (0, 0, k // 2, k // 2)), (-1, (k // 2, k // 2, 0, 0))):
        padded, n = F.pad(out[None], padding, mode="reflect")[0], out.shape[dim]
        out = padded.narrow(dim, 0, n) * weights[0]
        for i in range(1, k):
            out.add_(padded.narrow(dim, i, n), alpha=weights[i])
    return out


def speckle(rng: np.random.Generator, image: torch.Tensor, std: float) -> torch.Tensor:
    """Multiplicative, spatially correlated noise: what a different transducer position gives."""
    # torch draws the normals (3x faster than numpy's), seeded from `rng` so they stay a
    # pure function of the sample.
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
    noise = gaussian_blur(noise, 0.7)
    return image * (1 + std * noise / noise.std().clamp_min(1e-6))


def nearest_crop(mask: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """The crop (top, left, h, w) of `mask` [C, H, W] resized to size x size by nearest
    neighbour, each output pixel taking the source pixel under its centre (the alignment of
    the bilinear image resize)."""

    def source(start: int, length: int) -> torch.Tensor:
        return start + ((torch.arange(size) + 0.5) * (length / size)).long().clamp(max=length - 1)

    return mask.index_select(-2, source(top, h)).index_select(-1, source(left, w))


def lower_median(values: np.ndarray) -> float:
    """The lower of the two middle values (torch.median's rule), by partition in O(n)."""
    k = (values.size - 1) // 2
    return float(np.partition(values, k)[k])


def augment(
    rng: np.random.Generator, image: torch.Tensor, region: torch.Tensor, cfg: AugmentConfig, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """image uint8 [1, H, W], region bool [1, H, W] -> pixels float [1, S, S] in [0, 1], region bool."""
    top, left, h, w = crop_box(rng, image.shape[-2], image.shape[-1], cfg.crop_scale, cfg.crop_ratio)
    # Crop before the float conversion: only the kept pixels are converted.
    pixels = TF.resize(image[:, top : top + h, left : left + w].float(), [size, size], antialias=True).div_(255)
    region = nearest_crop(region, top, left, h, w, size)
    if rng.random() < cfg.hflip:
        pixels, region = pixels.flip(-1), region.flip(-1)
    if rng.random() < cfg.vflip:
        pixels, region = pixels.flip(-2), region.flip(-2)
    if rng.random() < cfg.blur:
        pixels = gaussian_blur(pixels, float(rng.uniform(*cfg.blur_sigma)))
    if rng.random() < cfg.speckle:
        pixels = speckle(rng, pixels, cfg.speckle_std)
    if rng.random() < cfg.contrast:
        inside = pixels.numpy()[region.numpy()]
        if inside.size:
            median = lower_median(inside)
            pixels = median + float(rng.uniform(*cfg.contrast_range)) * (pixels - median)
    # Outside the scan region there is no signal; keep it black whatever the photometrics did.
    return pixels.clamp_(0, 1).mul_(region), region


def resize_eval(image: torch.Tensor, region: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image and bool region [1, H, W] -> pixels float [1, S, S] in [0, 1] and region,
    with no randomness (probe, validation)."""
    pixels = image.float() / 255
    if pixels.shape[-2:] != (size, size):
        # Shorter side to `size`, then the centre square: shards stored with their aspect
        # ratio (resize mode short_side) are not distorted.
        pixels = TF.center_crop(TF.resize(pixels, size, antialias=True), [size, size])
        region = TF.center_crop(
            TF.resize(region.to(torch.uint8), size, interpolation=InterpolationMode.NEAREST), [size, size]
        ).bool()
    return pixels, region
