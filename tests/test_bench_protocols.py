"""The bench protocols: few-shot subsets have the quota of the rule, never split a patient and
are nested across fractions; degradations are the identity at severity 0, grow with severity
and stay black outside the scan; video aggregation follows its two rules, ties included."""

import math

import numpy as np
import pytest
import torch

from usjepa.bench.protocols import (
    FEWSHOT_FRACTIONS,
    ROBUSTNESS_KINDS,
    degrade,
    fewshot_indices,
    has_videos,
    video_level,
)
from usjepa.data.augment import gaussian_blur, speckle
from usjepa.errors import UserError

# ---------------------------------------------------------------------------------- few-shot

# Class sizes 100 / 30 / 7 / 50; per fraction, round(fraction * n) half up, at least 1.
SIZES = (100, 30, 7, 50)
EXPECTED = {
    0.01: (1, 1, 1, 1),  # 1, 0.3, 0.07, 0.5 (half up) -> at least 1 each
    0.05: (5, 2, 1, 3),  # 5, 1.5, 0.35, 2.5 (half up: 3, not half-to-even 2)
    0.10: (10, 3, 1, 5),
    0.50: (50, 15, 4, 25),  # 3.5 -> 4
    1.0: SIZES,
}


def _shuffled_labels(sizes=SIZES, seed=0):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("fraction", FEWSHOT_FRACTIONS)
def test_fewshot_takes_the_rounded_quota_of_each_class(fraction):
    labels = _shuffled_labels()
    rows = fewshot_indices(labels, None, fraction, seed=3)
    assert rows.dtype == np.int64 and np.array_equal(rows, np.unique(rows))
    assert tuple(np.bincount(labels[rows], minlength=len(SIZES))) == EXPECTED[fraction]


def test_fewshot_full_fraction_is_every_index():
    labels = _shuffled_labels()
    groups = np.arange(labels.size) // 3
    for g in (None, groups):
        assert np.array_equal(fewshot_indices(labels, g, 1.0, seed=5), np.arange(labels.size))


@pytest.mark.parametrize("with_groups", [False, True])
def test_fewshot_subsets_of_one_seed_are_nested(with_groups):
    labels, groups = _patients()
    rows = [
        set(fewshot_indices(labels, groups if with_groups else None, f, seed=7).tolist()) for f in FEWSHOT_FRACTIONS
    ]
    for small, large in zip(rows, rows[1:]):
        assert small <= large
    assert len(rows[0]) < len(rows[-1])


def test_fewshot_is_a_function_of_its_seed():
    labels = _shuffled_labels()
    first = fewshot_indices(labels, None, 0.1, seed=1)
    assert np.array_equal(first, fewshot_indices(labels, None, 0.1, seed=1))
    assert not np.array_equal(first, fewshot_indices(labels, None, 0.1, seed=2))


def _patients(seed=0):
    """Labels and string patient ids: 1-8 frames per patient, mostly one label, some mixed."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(120):
        size, label = int(rng.integers(1, 9)), int(rng.choice(3, p=[0.6, 0.3, 0.1]))
        frame_labels = np.full(size, label)
        if p % 10 == 0 and size > 2:  # a mixed patient: one frame of another class
            frame_labels[0] = (label + 1) % 3
        labels.extend(frame_labels.tolist())
        groups.extend([f"patient{p:03d}"] * size)
    return np.array(labels), np.array(groups)


@pytest.mark.parametrize("fraction", FEWSHOT_FRACTIONS[:-1])
def test_fewshot_takes_whole_patients_and_keeps_every_class(fraction):
    labels, groups = _patients()
    for seed in range(5):
        rows = fewshot_indices(labels, groups, fraction, seed)
        taken = np.zeros(labels.size, bool)
        taken[rows] = True
        for g in np.unique(groups[rows]):
            assert taken[groups == g].all(), (seed, g)  # never part of a patient
        assert set(labels[rows].tolist()) == {0, 1, 2}
        assert rows.size < labels.size


def test_fewshot_groups_are_taken_until_the_quota_is_reached():
    # Class 0: 20 patients x 3 frames, class 1: 10 x 2, class 2: 3 x 4. At 10% the quotas are
    # 6, 2 and 1 (1.2): two, one and one patients; the last class overshoots to 4 frames.
    labels = np.repeat([0, 1, 2], [60, 20, 12])
    groups = np.concatenate([np.arange(60) // 3, 100 + np.arange(20) // 2, 200 + np.arange(12) // 4])
    perm = np.random.default_rng(0).permutation(labels.size)  # order of the samples is irrelevant
    labels, groups = labels[perm], groups[perm]
    for fraction, want in ((0.05, (3, 2, 4)), (0.10, (6, 2, 4)), (0.50, (30, 10, 8))):
        rows = fewshot_indices(labels, groups, fraction, seed=4)
        assert tuple(np.bincount(labels[rows], minlength=3)) == want, fraction


def test_a_mixed_group_belongs_to_its_majority_label():
    # Patient "a" (labels 0, 0, 1) is class 0; class 1 has no patient of its own. At 1% class
    # 0's quota is one patient: either "a" whole or "b", never both, never part of "a".
    labels, groups = np.array([0, 1, 0, 0]), np.array(["a", "a", "a", "b"])
    seen = {tuple(fewshot_indices(labels, groups, 0.01, seed).tolist()) for seed in range(20)}
    assert seen == {(0, 1, 2), (3,)}
    # A tie (one frame each of 1 and 0) goes to the smaller label, 0; "u" is then class 1's
    # only patient, so both are always taken.
    labels, groups = np.array([1, 0, 1]), np.array(["t", "t", "u"])
    for seed in range(5):
        assert fewshot_indices(labels, groups, 0.01, seed).tolist() == [0, 1, 2]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, math.nan])
def test_fewshot_refuses_a_fraction_outside_0_1(fraction):
    with pytest.raises(UserError, match=r"fraction must be in \(0, 1\]") as err:
        fewshot_indices(np.zeros(4, int), None, fraction, seed=0)
    assert "\n" not in str(err.value)


def test_fewshot_refuses_groups_of_another_length():
    with pytest.raises(UserError, match="3 groups for 4 labels"):
        fewshot_indices(np.zeros(4, int), np.array(["a", "b", "c"]), 0.5, seed=0)


# -------------------------------------------------------------------------------- robustness


def _scan(size=64, seed=0):
    """A speckle-like B-mode image in a fan-shaped region: correlated Rayleigh speckle over
    depth attenuation, with an anechoic cyst; black outside the fan."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    radius, angle = np.hypot(yy + 4, xx - size / 2), np.arctan2(xx - size / 2, yy + 4)
    region = (radius > 10) & (radius < size) & (np.abs(angle) < 0.6)
    noise = gaussian_blur(torch.from_numpy(rng.standard_normal((2, size, size)).astype(np.float32)), 1.0)
    texture = noise.pow(2).sum(0).sqrt().numpy()
    tissue = np.exp(-radius / (2 * size)) * np.where(np.hypot(yy - 40, xx - 30) < 7, 0.15, 1.0)
    image = np.clip(texture * tissue / np.percentile(texture * tissue, 99), 0, 1) * region
    return torch.from_numpy(image.astype(np.float32))[None], torch.from_numpy(region)[None]


@pytest.mark.parametrize("kind", ROBUSTNESS_KINDS)
def test_severity_0_is_the_image_itself(kind):
    pixels, region = _scan()
    out = degrade(pixels, region, kind, 0, seed=1)
    assert torch.equal(out, pixels) and out.dtype == pixels.dtype


@pytest.mark.parametrize("kind", ROBUSTNESS_KINDS)
def test_the_distance_from_the_clean_image_grows_with_severity(kind):
    pixels, region = _scan()
    distance = [float((degrade(pixels, region, kind, e, seed=1) - pixels)[region].abs().mean()) for e in (1, 2, 3)]
    assert 0 < distance[0] < distance[1] < distance[2], distance


@pytest.mark.parametrize("kind", ROBUSTNESS_KINDS)
@pytest.mark.parametrize("severity", [1, 2, 3])
def test_degraded_images_stay_in_range_and_black_outside_the_scan(kind, severity):
    pixels, region = _scan()
    out = degrade(pixels, region, kind, severity, seed=2)
    assert out.shape == pixels.shape
    assert torch.isfinite(out).all()
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert not out[~region].any()


@pytest.mark.parametrize("severity, alpha", [(1, 0.7), (2, 0.5), (3, 0.3)])
def test_contrast_scales_the_in_region_spread_by_alpha(severity, alpha):
    _, region = _scan()
    # Values in [0.2, 0.8]: pulled toward a median inside that range they are never clamped.
    pixels = (0.2 + 0.6 * torch.rand(region.shape, generator=torch.Generator().manual_seed(0))) * region
    out = degrade(pixels, region, "contrast", severity, seed=0)
    before, after = pixels[region].double().std().item(), out[region].double().std().item()
    assert math.isfinite(after)
    assert after == pytest.approx(alpha * before, rel=1e-5)
    # The lower median is the fixed point of the pull.
    median = pixels[region].median()
    assert out[region][pixels[region] == median].tolist() == [median.item()]


def test_blur_and_speckle_are_the_augmentations_at_the_papers_strengths():
    pixels, region = _scan()
    assert torch.equal(degrade(pixels, region, "blur", 2, seed=0), gaussian_blur(pixels, 2.0).clamp(0, 1) * region)
    want = speckle(np.random.default_rng(9), pixels, 0.35 * 3).clamp(0, 1) * region
    assert torch.equal(degrade(pixels, region, "speckle", 3, seed=9), want)


def test_speckle_is_a_function_of_its_seed():
    pixels, region = _scan()
    first = degrade(pixels, region, "speckle", 2, seed=11)
    assert torch.equal(first, degrade(pixels, region, "speckle", 2, seed=11))
    assert not torch.equal(first, degrade(pixels, region, "speckle", 2, seed=12))
    assert torch.equal(pixels, _scan()[0])  # the input is not modified


def test_degrade_refuses_unknown_kinds_and_severities():
    pixels, region = _scan(16)
    with pytest.raises(UserError, match="'noise'; valid: blur, contrast, speckle"):
        degrade(pixels, region, "noise", 1, seed=0)
    with pytest.raises(UserError, match="4; valid: 0, 1, 2, 3"):
        degrade(pixels, region, "blur", 4, seed=0)


# ----------------------------------------------------------------------------------- videos

# Frames of videos b, a, b, c, a, a (first appearance: b, a, c).
#   a (label 0): frames 0.4/0.6, 0.4/0.6, 1.0/0.0 -> mean 0.6/0.4 -> 0; majority 1, 1, 0 -> 1.
#   b (label 2): frames ->2 (0.55), ->1 (0.51) -> mean 0.48/0.52 -> 2; majority 2 vs 1 tie -> 1.
#   c (label 2): one frame -> 2 either way.
VIDEOS = np.array(["b", "a", "b", "c", "a", "a"])
TRUTH = np.array([2, 0, 2, 2, 0, 0])
PROBS = np.array(
    [[0.0, 0.45, 0.55], [0.4, 0.6, 0.0], [0.0, 0.51, 0.49], [0.1, 0.2, 0.7], [0.4, 0.6, 0.0], [1.0, 0.0, 0.0]]
)


def test_video_mean_rule_averages_probabilities():
    ids, truth, pred = video_level(TRUTH, PROBS, VIDEOS, "mean")
    assert ids.tolist() == ["b", "a", "c"]
    assert truth.tolist() == [2, 0, 2]
    assert pred.tolist() == [2, 0, 2] and pred.dtype == np.int64


def test_video_majority_rule_counts_votes_and_breaks_ties_by_the_lowest_class():
    ids, truth, pred = video_level(TRUTH, PROBS.argmax(axis=1), VIDEOS, "majority")
    assert ids.tolist() == ["b", "a", "c"]
    assert truth.tolist() == [2, 0, 2]
    assert pred.tolist() == [1, 1, 2]  # a: 2 of 3 frames say 1; b: one vote each for 1 and 2


def test_video_with_frames_of_two_labels_is_refused_by_name():
    with pytest.raises(UserError, match="video 'x' has frames with different true labels \\[0, 1\\]"):
        video_level(np.array([0, 0, 1]), np.array([0, 0, 1]), np.array(["y", "x", "x"]), "majority")


def test_video_level_refuses_scores_that_do_not_fit_the_rule():
    with pytest.raises(UserError, match="'mean' needs class probabilities"):
        video_level(TRUTH, PROBS.argmax(axis=1), VIDEOS, "mean")
    with pytest.raises(UserError, match="'majority' needs predicted class indices"):
        video_level(TRUTH, PROBS, VIDEOS, "majority")
    with pytest.raises(UserError, match="valid: mean, majority"):
        video_level(TRUTH, PROBS, VIDEOS, "max")


def test_has_videos_needs_a_repeated_id():
    assert has_videos(VIDEOS)
    assert has_videos(np.array([3, 1, 3]))
    assert not has_videos(np.array(["a", "b", "c"]))
    assert not has_videos(np.array([], dtype=str))


def test_ids_that_group_several_labels_are_patients_not_videos():
    ids = np.array(["p1", "p1", "p2", "p2"])
    assert has_videos(ids, np.array([0, 0, 1, 1]))
    assert not has_videos(ids, np.array([0, 1, 1, 1]))
