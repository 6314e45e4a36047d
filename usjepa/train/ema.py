"""The target encoder of the I-JEPA baseline (`train.objective=ema`): an exponential moving
average of the student's encoder, never trained by gradients.

Under FSDP2 the target is sharded exactly like the student's encoder (same blocks, same
mesh), so each rank holds and updates only its shard: the update is local, with no
communication, and the target's memory per rank falls as 1/N like the student's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_target(encoder: nn.Module) -> nn.Module:
    """A frozen copy of `encoder` (the student's, before it is wrapped for training) in eval mode."""
    return copy.deepcopy(encoder).requires_grad_(False).eval()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place updates reach the parameter), or `t` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local else t


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter."""
    pairs = list(zip(target.named_parameters(), online.named_parameters(), strict=True))
    for (name_t, _), (name_o, _) in pairs:
        if name_t != name_o:
            raise RuntimeError(f"EMA target and student encoder differ: {name_t} vs {name_o}")
    torch._foreach_lerp_([_local(t) for (_, t), _ in pairs], [_local(o) for _, (_, o) in pairs], 1.0 - momentum)
