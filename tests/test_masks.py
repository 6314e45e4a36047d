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


def test_a_block_has_exactly_the_size_its_scale_and_aspect_give():
    rng = np.random.default_rng(0)
    # 0.1 of 196 patches = 19.6: square 4 x 4 (sqrt 4.43); aspect h/w = 2: 6 x 3 (sqrt 39.2, sqrt 9.8).
    assert block_shape(rng, (0.1, 0.1), (1.0, 1.0), GRID) == (4, 4)
    assert block_shape(rng, (0.1, 0.1), (2.0, 2.0), GRID) == (6, 3)
    assert block_shape(rng, (1.0, 1.0), (1.0, 1.0), GRID) == (GRID, GRID)
    cfg = MaskConfig(target_scale=(0.1, 0.1), target_aspect=(2.0, 2.0))
    for sample in range(20):
        for t in sample_masks(cfg, GRID, 0, 0, sample).targets:
            rows, cols = np.unravel_index(t, (GRID, GRID))
            assert len(t) == 18 and rows.max() - rows.min() == 5 and cols.max() - cols.min() == 2


def _placements(block: np.ndarray, shape: tuple[int, int], valid: np.ndarray) -> list[tuple[int, int]]:
    """The (top, left) of every `shape` rectangle whose intersection with `valid` is `block`."""
    h, w = shape
    found = []
    for top in range(GRID - h + 1):
        for left in range(GRID - w + 1):
            rect = np.zeros((GRID, GRID), bool)
            rect[top : top + h, left : left + w] = True
            if np.array_equal(np.flatnonzero(rect & valid), block):
                found.append((top, left))
    return found


def test_region_blocks_are_rectangles_cut_by_the_region_and_keep_min_keep():
    # A disc-shaped scan region: many placements keep fewer than min_keep patches, so the
    # re-placement path runs; every block must still be a rectangle intersected with the region.
    yy, xx = np.mgrid[:GRID, :GRID]
    valid = (yy - 9) ** 2 + (xx - 7) ** 2 <= 25
    cfg = MaskConfig(region_conditioned=True, target_scale=(0.1, 0.1), target_aspect=(1.0, 1.0), min_keep=12)
    short_first_tries = 0
    for sample in range(30):
        m = sample_masks(cfg, GRID, 0, 0, sample, valid)
        for t in m.targets:
            assert len(t) >= 12 and valid.flat[t].all()
            placements = _placements(t, (4, 4), valid)
            assert placements
            short_first_tries += len(t) < 16
        assert valid.flat[m.context].all()
    assert short_first_tries > 0  # some kept blocks are cut by the region edge


def test_block_positions_are_uniform_and_reach_the_last_row_and_column():
    # A 4 x 4 block on the 14 x 14 grid has 11 x 11 top-left positions; each must be drawn
    # about equally often (I-JEPA's placement never reaches the last one).
    cfg = MaskConfig(target_scale=(0.082, 0.082), target_aspect=(1.0, 1.0), num_targets=1)
    counts = np.zeros((11, 11))
    draws = 6000
    for sample in range(draws):
        (t,) = sample_masks(cfg, GRID, 0, 0, sample).targets
        rows, cols = np.unravel_index(t, (GRID, GRID))
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
        counts[rows.min(), cols.min()] += 1
    expected = draws / counts.size
    assert counts.min() > 0 and counts[10, :].sum() > 0 and counts[:, 10].sum() > 0
    # Rows and columns of positions, 11 cells each: within 4 standard deviations of uniform.
    for margin in (counts.sum(0), counts.sum(1)):
        assert np.abs(margin - draws / 11).max() < 4 * np.sqrt(draws / 11)
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)
