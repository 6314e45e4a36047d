import numpy as np
import torch

from usjepa.config import MaskConfig
from usjepa.data.masks import block_shape, collate_masks, mask_lengths, sample_masks, valid_patches

GRID = 14  # 224 px / 16, the paper's setting


def test_paper_masks_have_the_configured_sizes_and_counts():
    cfg = MaskConfig()
    for step in range(20):
        m = sample_masks(cfg, GRID, seed=0, step=step, sample=0)
        assert len(m.targets) == 4
        for t in m.targets:
            # 0.075-0.125 of 196 patches, up to rounding of the block sides
            assert 0.04 * GRID**2 <= len(t) <= 0.2 * GRID**2
        assert len(m.context) >= cfg.min_keep
        # the student never sees what it must predict
        assert not set(m.context) & set(np.concatenate(m.targets))


def test_blocks_are_rectangles_with_aspect_in_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = block_shape(rng, (0.075, 0.125), (0.75, 1.5), GRID)
        assert 1 <= h <= GRID and 1 <= w <= GRID
        assert 0.4 <= h / w <= 2.5  # rounding of small blocks widens the range a little


def test_masks_are_pure_functions_of_seed_step_sample():
    cfg = MaskConfig()
    a = sample_masks(cfg, GRID, seed=1, step=5, sample=3)
    b = sample_masks(cfg, GRID, seed=1, step=5, sample=3)
    c = sample_masks(cfg, GRID, seed=1, step=5, sample=4)
    d = sample_masks(cfg, GRID, seed=2, step=5, sample=3)
    assert np.array_equal(a.context, b.context) and all(np.array_equal(x, y) for x, y in zip(a.targets, b.targets))
    assert not np.array_equal(a.context, c.context) or not np.array_equal(a.targets[0], c.targets[0])
    assert not np.array_equal(a.context, d.context) or not np.array_equal(a.targets[0], d.targets[0])


def test_one_block_shape_per_batch():
    cfg = MaskConfig()
    sizes = {len(sample_masks(cfg, GRID, 0, step=9, sample=i).targets[0]) for i in range(16)}
    assert len(sizes) == 1


def test_region_conditioning_keeps_blocks_inside_the_region():
    cfg = MaskConfig(region_conditioned=True)
    region = np.zeros((224, 224), bool)
    region[:, 60:170] = True  # a band of signal with black borders left and right
    valid = valid_patches(region, 16, 1)
    assert valid.sum() == 14 * 8  # columns 48-175 hold signal
    for step in range(10):
        m = sample_masks(cfg, GRID, 0, step, 0, valid)
        flat = valid.reshape(-1)
        assert flat[m.context].all()
        for t in m.targets:
            assert flat[t].all() and len(t) >= 1
        assert len(m.context) >= cfg.min_keep


def test_region_switch_off_ignores_the_region():
    cfg = MaskConfig(region_conditioned=False)
    valid = np.zeros((GRID, GRID), bool)
    valid[:, :3] = True
    hits = [sample_masks(cfg, GRID, 0, s, 0, valid) for s in range(10)]
    assert any((~valid.reshape(-1)[m.context]).any() for m in hits)


def test_valid_patches_threshold():
    region = np.zeros((32, 32), bool)
    region[0, 0] = True
    region[16:20, 16:20] = True
    assert valid_patches(region, 16, 1).tolist() == [[True, False], [False, True]]
    assert valid_patches(region, 16, 2).tolist() == [[False, False], [False, True]]


def region_masks(n: int, step: int = 1) -> list:
    """Region-conditioned masks of `n` samples whose regions differ, so lengths differ."""
    cfg = MaskConfig(region_conditioned=True, min_keep=4)
    out = []
    for i in range(n):
        valid = np.zeros((GRID, GRID), bool)
        valid[:, : 4 + i] = True  # a region 4 + i patch columns wide
        out.append(sample_masks(cfg, GRID, 0, step, i, valid))
    return out


def test_collate_keeps_every_sampled_patch_of_every_sample():
    masks = region_masks(6)
    lengths = {len(m.context) for m in masks} | {len(t) for m in masks for t in m.targets}
    assert len(lengths) > 2  # the test needs masks of different lengths
    batch = collate_masks(masks, list(range(6)), 0, 1)
    assert batch.context.shape == (6, max(len(m.context) for m in masks))
    assert batch.targets.shape == (4, 6, max(len(t) for m in masks for t in m.targets))
    for i, m in enumerate(masks):
        assert batch.context[i][batch.context_valid[i]].tolist() == m.context.tolist()
        for t in range(4):
            assert batch.targets[t, i][batch.target_valid[t, i]].tolist() == m.targets[t].tolist()
    # Drawn == kept: nothing is dropped.
    assert int(batch.context_valid.sum()) == sum(len(m.context) for m in masks)
    assert int(batch.target_valid.sum()) == sum(len(t) for m in masks for t in m.targets)


def test_truncating_collation_cuts_to_the_smallest_mask_without_new_indices():
    masks = region_masks(6)
    batch = collate_masks(masks, list(range(6)), 0, 1, mask_lengths(masks))
    assert batch.context.shape == (6, min(len(m.context) for m in masks))
    assert batch.context_valid.all() and batch.target_valid.all()
    for i, m in enumerate(masks):
        assert set(batch.context[i].tolist()) <= set(m.context.tolist())
        for t in range(4):
            assert set(batch.targets[t, i].tolist()) <= set(m.targets[t].tolist())


def test_what_a_sample_keeps_does_not_depend_on_its_batch_mates():
    # Ranks collate their shares separately (truncation: with the global lengths): a sample's
    # cut must not depend on which samples share its rank.
    masks = region_masks(8, step=3)
    lengths = mask_lengths(masks)
    whole = collate_masks(masks, list(range(8)), 0, 3, lengths)
    half = collate_masks(masks[4:], list(range(4, 8)), 0, 3, lengths)
    assert torch.equal(whole.context[4:], half.context) and torch.equal(whole.targets[:, 4:], half.targets)
    whole, half = collate_masks(masks, list(range(8)), 0, 3), collate_masks(masks[4:], list(range(4, 8)), 0, 3)
    for i in range(4):
        assert torch.equal(whole.context[4 + i][whole.context_valid[4 + i]], half.context[i][half.context_valid[i]])


def test_tiny_region_degrades_gracefully():
    cfg = MaskConfig(region_conditioned=True, min_keep=10)
    valid = np.zeros((GRID, GRID), bool)
    valid[0, :5] = True  # fewer valid patches than min_keep: masking falls back to the full grid
    m = sample_masks(cfg, GRID, 0, 0, 0, valid)
    assert len(m.context) >= 1 and all(len(t) >= 1 for t in m.targets)


def test_targets_are_redrawn_until_the_context_keeps_min_keep_and_it_is_never_empty():
    # Stage-1-sized targets on a small grid often leave the context short: re-drawn.
    cfg = MaskConfig(target_scale=(0.25, 0.25), target_aspect=(1.0, 1.0), min_keep=3)
    for sample in range(50):
        m = sample_masks(cfg, 4, 0, 0, sample)
        assert len(m.context) >= 3
        assert not set(m.context) & set(np.concatenate(m.targets))
    # Targets that cover the whole grid on every draw: the context takes one target patch.
    whole = MaskConfig(target_scale=(1.0, 1.0), target_aspect=(1.0, 1.0), min_keep=1, max_tries=3)
    m = sample_masks(whole, 2, 0, 0, 0)
    assert len(m.context) == 1
    assert all(len(t) == 3 and m.context[0] not in t for t in m.targets)
