"""The augmentations: the fast blur equals torchvision's, the region crop is the nearest
neighbour under each output pixel's centre, and image and region stay aligned through crops
and flips."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from usjepa.config import AugmentConfig
from usjepa.data.augment import augment, gaussian_blur, lower_median, nearest_crop


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.0, 2.3])
def test_blur_equals_torchvisions(sigma):
    torch.manual_seed(0)
    image = torch.rand(1, 40, 56)
    k = 2 * int(np.ceil(3 * sigma)) + 1
    want = TF.gaussian_blur(image, kernel_size=[k, k], sigma=[sigma, sigma])
    torch.testing.assert_close(gaussian_blur(image, sigma), want, atol=1e-6, rtol=1e-6)


def test_nearest_crop_takes_the_pixel_under_each_output_centre():
    mask = torch.arange(8 * 8).reshape(1, 8, 8)
    assert torch.equal(nearest_crop(mask, 0, 0, 8, 8, 8), mask)
    # 2x down: output pixel i covers source pixels 2i, 2i+1; its centre falls on 2i+1.
    assert torch.equal(nearest_crop(mask, 0, 0, 8, 8, 4), mask[:, 1::2, 1::2])
    # 2x up from the crop at rows 2-3, columns 4-5: each source pixel twice.
    up = nearest_crop(mask, 2, 4, 2, 2, 4)
    assert up[0].tolist() == [[20, 20, 21, 21], [20, 20, 21, 21], [28, 28, 29, 29], [28, 28, 29, 29]]


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_lower_median_is_torchs_median(n):
    values = np.random.default_rng(n).random(n).astype(np.float32)
    assert lower_median(values) == torch.from_numpy(values).median().item()


def test_image_and_region_stay_aligned_through_crops_and_flips():
    # An image that is its own region (white inside, black outside): after any crop and flip,
    # the pixels and the region may differ only on the region's border (bilinear vs nearest).
    region = np.zeros((60, 80), bool)
    region[10:50, 5:45] = True  # off-centre, so a flip that skipped the region would show
    image = torch.from_numpy(region.astype(np.uint8) * 255)[None]
    cfg = AugmentConfig(blur=0, speckle=0, contrast=0, hflip=0.5, vflip=0.5, crop_scale=(0.3, 1.0))
    for seed in range(20):
        pixels, out_region = augment(np.random.default_rng(seed), image, torch.from_numpy(region)[None], cfg, 32)
        assert pixels.shape == out_region.shape == (1, 32, 32)
        assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1
        assert not pixels[~out_region].any()  # black outside the region
        r = np.pad(out_region[0].numpy(), 1)  # the output border is a border too
        interior = r[:-2, 1:-1] & r[2:, 1:-1] & r[1:-1, :-2] & r[1:-1, 2:] & r[1:-1, 1:-1]
        assert (pixels[0].numpy()[interior] > 0.99).all(), seed


def test_augment_is_a_function_of_its_generator():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (1, 50, 70), dtype=np.uint8))
    region = torch.ones(1, 50, 70, dtype=torch.bool)
    cfg = AugmentConfig(blur=1, speckle=1, contrast=1)
    a = augment(np.random.default_rng([3, 1]), image, region, cfg, 24)
    b = augment(np.random.default_rng([3, 1]), image, region, cfg, 24)
    c = augment(np.random.default_rng([3, 2]), image, region, cfg, 24)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
