"""Learning-rate, weight-decay and EMA-momentum schedules as pure functions of the step.

A resumed run calls them with the restored step: nothing to fast-forward, nothing to save.
"""

from __future__ import annotations

import math


def cosine(progress: float, start: float, end: float) -> float:
    """Half-cosine from `start` (progress 0) to `end` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def linear(progress: float, start: float, end: float) -> float:
    """Straight line from `start` (progress 0) to `end` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress


def ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """Momentum of the EMA target for the update after step `step` (0-based): linear from
    `start` to `end` over the run, as in I-JEPA."""
    return linear(step / total_steps, start, end)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, start: float, peak: float, final: float) -> float:
    """Linear warm-up start -> peak over `warmup_steps`, then cosine peak -> final at `total_steps`."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    return cosine((step - warmup_steps) / max(total_steps - warmup_steps, 1), peak, final)
