"""Multi-block masks (I-JEPA / US-JEPA) as pure functions of (seed, step, sample).

A batch gets one context-block size and one target-block size (drawn from (seed, step)), as
in I-JEPA, so that all samples predict blocks of the same shape; each sample places its blocks
with its own generator drawn from (seed, step, sample). The context block loses every patch
that a target block covers, so the student never sees what it must predict.

USrc-JEPA (region conditioning): a patch is valid when it holds at least `region_min_pixels`
pixels of the ultrasound region; every block is intersected with the valid patches and
re-placed until it keeps `min_keep` of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from usjepa.config import MaskConfig


@dataclass(frozen=True)
class SampleMasks:
    context: np.ndarray  # sorted flat patch indices the student sees
    targets: tuple[np.ndarray, ...]  # one sorted index array per target block


def block_shape(
    rng: np.random.Generator, scale: tuple[float, float], aspect: tuple[float, float], grid: int
) -> tuple[int, int]:
    """Height and width (in patches) of a block covering `scale` of the grid with ratio h/w = `aspect`."""
    s = rng.uniform(*scale)
    # Aspect is drawn log-uniformly so that 0.75 and 1/0.75 are equally likely.
    a = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    area = s * grid * grid
    h = int(round(math.sqrt(area * a)))
    w = int(round(math.sqrt(area / a)))
    return min(max(h, 1), grid), min(max(w, 1), grid)


def place_block(
    rng: np.random.Generator, shape: tuple[int, int], grid: int, allowed: np.ndarray, min_keep: int, max_tries: int
) -> np.ndarray:
    """A boolean (grid, grid) block of `shape` at a random position, intersected with `allowed`.

    Re-placed until it keeps `min_keep` allowed patches; after `max_tries` the attempt that
    kept the most wins, so a tiny region degrades the mask instead of looping forever.
    """
    h, w = shape
    best = None
    for _ in range(max_tries):
        top = rng.integers(0, grid - h + 1)
        left = rng.integers(0, grid - w + 1)
        block = np.zeros((grid, grid), dtype=bool)
        block[top : top + h, left : left + w] = True
        block &= allowed
        if best is None or block.sum() > best.sum():
            best = block
        if best.sum() >= min_keep:
            break
    return best


def valid_patches(region: np.ndarray, patch_size: int, min_pixels: int) -> np.ndarray:
    """(grid, grid) booleans: patches holding at least `min_pixels` region pixels."""
    g_h, g_w = region.shape[0] // patch_size, region.shape[1] // patch_size
    counts = region[: g_h * patch_size, : g_w * patch_size].reshape(g_h, patch_size, g_w, patch_size).sum((1, 3))
    return counts >= min_pixels


def batch_shapes(cfg: MaskConfig, grid: int, seed: int, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Context and target block shapes shared by every sample of batch `step`."""
    rng = np.random.default_rng([seed, step, 0x5EED])
    context = block_shape(rng, cfg.context_scale, cfg.context_aspect, grid)
    target = block_shape(rng, cfg.target_scale, cfg.target_aspect, grid)
    return context, target


def sample_masks(
    cfg: MaskConfig, grid: int, seed: int, step: int, sample: int, region_valid: np.ndarray | None = None
) -> SampleMasks:
    """Context and target indices for one sample; identical for identical arguments.

    The targets are re-drawn until the context keeps `min_keep` patches (large stage-1 targets
    can cover nearly the whole grid); after `max_tries` the draw with the largest context wins,
    and a context that is still empty takes one target patch, so the student always sees
    something.
    """
    context_shape, target_shape = batch_shapes(cfg, grid, seed, step)
    rng = np.random.default_rng([seed, step, sample])
    allowed = np.ones((grid, grid), dtype=bool)
    if cfg.region_conditioned and region_valid is not None and region_valid.sum() >= cfg.min_keep:
        allowed = region_valid
    best = None
    for _ in range(cfg.max_tries):
        targets = [
            place_block(rng, target_shape, grid, allowed, cfg.min_keep, cfg.max_tries) for _ in range(cfg.num_targets)
        ]
        covered = np.logical_or.reduce(targets)
        context = place_block(rng, context_shape, grid, allowed & ~covered, cfg.min_keep, cfg.max_tries)
        if not context.any():  # the block missed what is left: fall back to any uncovered patch
            context = ~covered
        if best is None or context.sum() > best[0].sum():
            best = context, targets
        if context.sum() >= cfg.min_keep:
            break
    context, targets = best
    if not context.any():
        moved = rng.choice(np.flatnonzero(np.logical_or.reduce(targets)))
        context = context.copy()
        context.flat[moved] = True
        for t in targets:
            t.flat[moved] = False
    return SampleMasks(context=np.flatnonzero(context), targets=tuple(np.flatnonzero(t) for t in targets))


def _take(rng: np.random.Generator, idx: np.ndarray, n: int) -> np.ndarray:
    """`n` of `idx` chosen at random (not the first n, which would favour the top rows), sorted."""
    if len(idx) == n:
        return idx
    return np.sort(rng.choice(idx, size=n, replace=False))


def _pad(idx: np.ndarray, n: int) -> np.ndarray:
    """`idx` padded to length `n` with its own first index: a pad position gathers a token the
    mask already holds (and tints an already tinted patch), and is excluded by its valid flag.
    An empty block (a region too small for it) is padded with patch 0, all of it invalid."""
    return np.concatenate([idx, np.full(n - len(idx), idx[0] if len(idx) else 0, dtype=np.int64)])


def mask_lengths(masks: list[SampleMasks]) -> tuple[int, int]:
    """(context, target) lengths every mask of `masks` can be cut to: the smallest of each."""
    return min(len(m.context) for m in masks), min(len(t) for m in masks for t in m.targets)


@dataclass(frozen=True)
class MaskBatch:
    """Masks of a batch as padded index tensors with valid flags.

    context [B, Kc] and targets [T, B, Kt] hold flat patch indices, valid ones first in each
    row; `context_valid` / `target_valid` (same shapes) say which are real. Kc and Kt are the
    longest mask of the batch, so no sampled patch is lost.
    """

    context: torch.Tensor
    context_valid: torch.Tensor
    targets: torch.Tensor
    target_valid: torch.Tensor


def collate_masks(
    masks: list[SampleMasks], sample_ids: list[int], seed: int, step: int, truncate_to: tuple[int, int] | None = None
) -> MaskBatch:
    """Stack per-sample masks into padded tensors; every sample keeps all its patches.

    With `truncate_to` = (Kc, Kt) every mask is instead cut to those lengths (I-JEPA's
    collation, `mask.truncate_to_shortest`): a distributed step passes the minimum over the
    whole global batch, so that what a sample keeps does not depend on which rank holds it;
    for the same reason each longer mask is subsampled by a generator of (seed, step, sample
    id) alone.
    """
    if truncate_to is not None:
        kc, kt = truncate_to
        contexts, targets = [], []
        for sample, m in zip(sample_ids, masks):
            rng = np.random.default_rng([seed, step, sample, 0xC011A7E])
            contexts.append(_take(rng, m.context, kc))
            targets.append(np.stack([_take(rng, t, kt) for t in m.targets]))
    else:
        kc = max(len(m.context) for m in masks)
        kt = max(len(t) for m in masks for t in m.targets)
        contexts = [_pad(m.context, kc) for m in masks]
        targets = [np.stack([_pad(t, kt) for t in m.targets]) for m in masks]
    context = torch.from_numpy(np.stack(contexts)).long()
    target = torch.from_numpy(np.stack(targets, axis=1)).long()
    lengths = torch.tensor([len(m.context) for m in masks])
    target_lengths = torch.tensor([[len(t) for t in m.targets] for m in masks]).T  # [T, B]
    if truncate_to is not None:
        lengths, target_lengths = lengths.clamp(max=kc), target_lengths.clamp(max=kt)
    return MaskBatch(
        context=context,
        context_valid=torch.arange(kc) < lengths[:, None],
        targets=target,
        target_valid=torch.arange(kt) < target_lengths[..., None],
    )
