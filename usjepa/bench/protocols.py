"""The benchmark's evaluation protocols (docs/method.md#bench-protocols): few-shot label subsets,
degraded test images, and frame-to-video aggregation.

Pure functions: arrays in, arrays out, and every random choice from the seed passed in (never
global RNG state), so a protocol's subset or view is the same on every run and machine.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from usjepa.data.augment import gaussian_blur, lower_median, speckle
from usjepa.errors import UserError

FEWSHOT_FRACTIONS = (0.01, 0.05, 0.10, 0.50, 1.0)

ROBUSTNESS_KINDS = ("blur", "contrast", "speckle")
SEVERITIES = (0, 1, 2, 3)
# Per severity 1, 2, 3 (index 0 is the identity and unused): the paper's contrast factors.
_CONTRAST_ALPHA = (1.0, 0.7, 0.5, 0.3)
_SPECKLE_STD_PER_SEVERITY = 0.35

VIDEO_RULES = ("mean", "majority")


# ---------------------------------------------------------------------------------- few-shot


def fewshot_indices(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """Sorted int64 indices of a stratified subset of the train split holding `fraction` of it.

    Per class the quota is round(fraction * n_class), rounding half up (5% of 50 is 3, not
    Python's half-to-even 2), and at least 1. Units are groups (patients, videos), never split:
    each group belongs to the class of its majority label, a class's groups are shuffled with
    `seed` and taken in that order until their samples reach the quota (the last group may
    overshoot it). Without `groups` every sample is its own group, so the quota is exact.

    Mixed groups (frames of more than one label) go whole to their majority label (a tie to
    the smallest label) and count all their samples towards that class's quota and pool
    (n_class); their minority frames come along rather than splitting the patient. A class
    that is the majority of no group therefore has no groups of its own and appears in a
    subset only through mixed groups taken for other classes.

    Each class's order is drawn once per seed, independent of `fraction`, and a larger
    fraction takes a longer prefix of it: the subsets of one seed are nested. fraction 1.0
    returns every index.
    """
    labels = np.asarray(labels)
    if not 0 < fraction <= 1:  # also refuses NaN
        raise UserError(f"few-shot fraction must be in (0, 1], got {fraction}")
    if labels.ndim != 1:
        raise UserError(f"few-shot labels must be 1-D (one per sample), got shape {labels.shape}")
    if groups is not None and np.shape(groups) != labels.shape:
        raise UserError(
            f"few-shot groups must match the labels one to one: {len(groups)} groups for {labels.shape[0]} labels"
        )
    if fraction == 1.0 or labels.size == 0:
        return np.arange(labels.shape[0], dtype=np.int64)
    group_codes = np.arange(labels.shape[0]) if groups is None else np.unique(groups, return_inverse=True)[1]
    label_codes = np.unique(labels, return_inverse=True)[1]
    group_class, group_size = _group_classes(group_codes, label_codes)
    rng = np.random.default_rng(seed)
    chosen = [
        _prefix(rng.permutation(np.flatnonzero(group_class == c)), group_size, fraction)
        for c in range(int(label_codes.max()) + 1)
    ]
    return np.flatnonzero(np.isin(group_codes, np.concatenate(chosen))).astype(np.int64)


def _group_classes(group_codes: np.ndarray, label_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(majority label, sample count) per group code; argmax breaks ties by the smallest label."""
    counts = np.zeros((int(group_codes.max()) + 1, int(label_codes.max()) + 1), np.int64)
    np.add.at(counts, (group_codes, label_codes), 1)
    return counts.argmax(axis=1), counts.sum(axis=1)


def _prefix(order: np.ndarray, group_size: np.ndarray, fraction: float) -> np.ndarray:
    """The shortest prefix of the shuffled groups `order` whose samples reach the class quota."""
    if order.size == 0:
        return order
    reached = np.cumsum(group_size[order])
    return order[: int(np.searchsorted(reached, _quota(int(reached[-1]), fraction))) + 1]


def _quota(n: int, fraction: float) -> int:
    """round(fraction * n), half up, at least 1. The 1e-9 absorbs float error in products
    such as 0.05 * 50 that are exact halves in decimal."""
    return max(1, math.floor(fraction * n + 0.5 + 1e-9))


# -------------------------------------------------------------------------------- robustness


def degrade(pixels: torch.Tensor, region: torch.Tensor, kind: str, severity: int, seed: int) -> torch.Tensor:
    """A test image [1, H, W] in [0, 1] degraded by `kind` at `severity` e (the paper's 1-3).

    blur: Gaussian, sigma = e pixels. contrast: every pixel pulled toward the in-region lower
    median m, p' = m + alpha (p - m), alpha = 0.7 / 0.5 / 0.3. speckle: multiplicative,
    spatially correlated noise of sd 0.35 e, drawn from `seed` (the caller passes one per
    sample, so a view does not depend on the order images are seen in). The result is clamped
    to [0, 1] and zeroed outside `region`, as the training augmentations do. Severity 0 returns
    `pixels` itself, untouched, so the clean view is bit-exact.
    """
    if kind not in ROBUSTNESS_KINDS:
        raise UserError(f"unknown degradation {kind!r}; valid: {', '.join(ROBUSTNESS_KINDS)}")
    if severity not in SEVERITIES:
        raise UserError(f"unknown severity {severity!r}; valid: {', '.join(map(str, SEVERITIES))}")
    if severity == 0:
        return pixels
    if kind == "blur":
        out = gaussian_blur(pixels, float(severity))
    elif kind == "contrast":
        out = _pull_to_median(pixels, region, _CONTRAST_ALPHA[severity])
    else:
        out = speckle(np.random.default_rng(seed), pixels, _SPECKLE_STD_PER_SEVERITY * severity)
    # Outside the scan region there is no signal; keep it black whatever the degradation did.
    return out.clamp_(0, 1).mul_(region)


def _pull_to_median(pixels: torch.Tensor, region: torch.Tensor, alpha: float) -> torch.Tensor:
    """m + alpha (p - m) with m the in-region lower median; an empty region has no median and
    its output is all zero after masking anyway, so the pixels are returned as a copy."""
    inside = pixels[region].cpu().numpy()
    if inside.size == 0:
        return pixels.clone()
    median = lower_median(inside)
    return median + alpha * (pixels - median)


# ----------------------------------------------------------------------------------- videos


def has_videos(videos: np.ndarray, labels: np.ndarray | None = None) -> bool:
    """True when some video id repeats: only then does a video-level score differ from the
    frame-level one. With `labels`, also every id must carry one label: ids that group samples
    of different labels are patients with several findings, not videos, and have no
    video-level score."""
    videos = np.asarray(videos)
    n_videos = np.unique(videos).size
    if n_videos == videos.size:
        return False
    return labels is None or len(set(zip(videos.tolist(), np.asarray(labels).tolist()))) == n_videos


def video_level(
    y_true: np.ndarray, scores: np.ndarray, videos: np.ndarray, rule: str = "mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame-level -> video-level: (video ids in first-appearance order, true label per video,
    predicted label per video).

    rule "mean": `scores` are class probabilities [N, C], averaged over a video's frames, then
    argmax. rule "majority": `scores` are predicted classes [N], the most frequent one wins.
    Either way a tie goes to the lowest class index (np.argmax's rule), so the answer does not
    depend on frame order. A video whose frames carry different true labels has no one label
    to score and is refused.
    """
    y_true, scores, videos = np.asarray(y_true), np.asarray(scores), np.asarray(videos)
    if rule not in VIDEO_RULES:
        raise UserError(f"unknown video rule {rule!r}; valid: {', '.join(VIDEO_RULES)}")
    if y_true.ndim != 1 or videos.shape != y_true.shape or scores.shape[:1] != y_true.shape:
        raise UserError(
            f"video_level needs one label, score row and video id per frame: labels {y_true.shape}, "
            f"scores {scores.shape}, videos {videos.shape}"
        )
    if y_true.size == 0:
        raise UserError("video_level got no frames; there is nothing to score")
    ids, first, codes = _first_appearance(videos)
    truth = y_true[first]
    mixed = np.flatnonzero(y_true != truth[codes])
    if mixed.size:
        video = videos[mixed[:1]].tolist()[0]  # a plain Python value, so the message shows 'x'
        found = sorted(np.unique(y_true[codes == codes[mixed[0]]]).tolist())
        raise UserError(
            f"video {video!r} has frames with different true labels {found}; "
            f"a video-level score needs one label per video"
        )
    votes = _mean_votes(scores, codes, ids.size) if rule == "mean" else _majority_votes(scores, codes, ids.size)
    return ids, truth, votes.argmax(axis=1).astype(np.int64)


def _first_appearance(videos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique ids in first-appearance order, each id's first frame, each frame's id code)."""
    _, first, inverse = np.unique(videos, return_index=True, return_inverse=True)
    order = np.argsort(first)  # np.unique sorts by value; reorder by first frame
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return videos[first[order]], first[order], rank[inverse.reshape(-1)]


def _mean_votes(probabilities: np.ndarray, codes: np.ndarray, n_videos: int) -> np.ndarray:
    """Mean class probabilities per video [V, C]."""
    if probabilities.ndim != 2:
        raise UserError(f"video rule 'mean' needs class probabilities [N, C], got shape {probabilities.shape}")
    sums = np.zeros((n_videos, probabilities.shape[1]), np.float64)
    np.add.at(sums, codes, probabilities)
    return sums / np.bincount(codes, minlength=n_videos)[:, None]


def _majority_votes(predictions: np.ndarray, codes: np.ndarray, n_videos: int) -> np.ndarray:
    """Frame counts per video and predicted class [V, C]."""
    if predictions.ndim != 1 or not np.issubdtype(predictions.dtype, np.integer) or predictions.min() < 0:
        raise UserError(
            f"video rule 'majority' needs predicted class indices [N] (integers >= 0), "
            f"got shape {predictions.shape}, dtype {predictions.dtype}"
        )
    counts = np.zeros((n_videos, int(predictions.max()) + 1), np.int64)
    np.add.at(counts, (codes, predictions), 1)
    return counts
