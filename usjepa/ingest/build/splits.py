"""Deterministic, group-disjoint train/val/test splits, stratified by class, and seeded
orderings: same groups + same seed -> same splits on any machine (docs/data.md#splits)."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence


def seeded_hash(seed: int, *parts: str) -> str:
    """A stable hex digest of the seed and parts (not Python's salted hash())."""
    text = "\x1f".join([str(seed), *parts])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seeded_order(keys: Sequence[str], seed: int, salt: str = "order") -> list[int]:
    """Indices of `keys` in a deterministic pseudo-random order for this seed."""
    return sorted(range(len(keys)), key=lambda i: (seeded_hash(seed, salt, keys[i]), keys[i]))


def assign_splits(
    members: Iterable[tuple[str, int]],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify: bool = True,
) -> dict[str, str]:
    """Map each group to 'train', 'val' or 'test'.

    members: one (group, label) pair per image. Fractions are shares of images.
    """
    if not (0 <= val_fraction <= 1 and 0 <= test_fraction <= 1 and val_fraction + test_fraction <= 1):
        raise ValueError(f"split fractions val={val_fraction}, test={test_fraction} must be in [0, 1], sum <= 1")
    sizes: Counter[str] = Counter()
    labels: dict[str, Counter[int]] = defaultdict(Counter)
    for group, label in members:
        sizes[group] += 1
        labels[group][label] += 1
    strata: dict[int, list[str]] = defaultdict(list)
    for group in sizes:
        # majority class; ties go to the smallest label so the choice is deterministic
        majority = min(labels[group].items(), key=lambda kv: (-kv[1], kv[0]))[0] if stratify else 0
        strata[majority].append(group)
    # Position of each group within its class (hash order, midpoint of its images); sorting
    # all groups by that position interleaves the classes evenly, so filling the cumulative
    # shares over the merged order stratifies without rounding each small class separately.
    position: dict[str, tuple[float, str, str]] = {}
    for stratum in strata.values():
        ranked = sorted((seeded_hash(seed, "split", g), g) for g in stratum)
        total = sum(sizes[g] for _, g in ranked)
        done = 0
        for digest, group in ranked:
            position[group] = ((done + sizes[group] / 2) / total, digest, group)
            done += sizes[group]
    bounds = ((test_fraction, "test"), (test_fraction + val_fraction, "val"))
    total = sum(sizes.values())
    split_of: dict[str, str] = {}
    done = 0
    for group in sorted(position, key=position.__getitem__):
        midpoint = (done + sizes[group] / 2) / total
        split_of[group] = next((name for bound, name in bounds if midpoint < bound), "train")
        done += sizes[group]
    return split_of
