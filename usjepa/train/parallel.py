"""Where the trainer meets torch.distributed: the world it runs in, the few small collectives
a step needs, and how the student is prepared (activation checkpointing, compile, FSDP2).

In a single process every collective is the identity and the student is not wrapped, so one
code path serves 1 and N ranks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from usjepa.config import Config
from usjepa.train.distributed import DistEnv, cuda_index, init_distributed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device
    launcher: str = "single"  # torchrun | slurm | single
    # A gloo group for the step's few metadata numbers, so that gathering them on a CUDA run
    # does not wait for the GPU (None: the default group, already on the CPU).
    cpu_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @staticmethod
    def join(cfg: Config, device: torch.device, env: DistEnv | None = None) -> World:
        """Join the process group of this launch (torchrun, srun, or none); on CUDA each rank
        takes the GPU of its local rank."""
        env = init_distributed(device, env, timeout_s=cfg.distributed.timeout_s)
        cpu_group = None
        if device.type == "cuda" and env.is_distributed:
            device = torch.device("cuda", cuda_index(env.local_rank))
            cpu_group = dist.new_group(backend="gloo")
        return World(env.rank, env.world_size, device, env.source, cpu_group)

    # -- collectives (identity in one process) ------------------------------------------------
    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values` (a few numbers; integers stay exact), in rank order."""
        if not self.distributed:
            return [list(values)]
        device = "cpu" if self.cpu_group is not None else self.device
        mine = torch.tensor(values, dtype=torch.float64, device=device)
        out = torch.empty(self.size * len(values), dtype=torch.float64, device=device)
        dist.all_gather_single(out, mine, group=self.cpu_group)
        return out.view(self.size, len(values)).tolist()

    def gather_objects(self, obj: object) -> list[object]:
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def as_float(value: torch.Tensor) -> float:
    """A scalar that may be a DTensor (a norm over sharded parameters) as a Python float."""
    full = getattr(value, "full_tensor", None)
    return float((full() if full else value).item())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the student's encoder and predictor: the units of sharding, recompute and compile."""
    return [*model.encoder.blocks, *model.predictor.blocks]


def prepare_student(model: nn.Module, cfg: Config, world: World) -> nn.Module:
    """Activation checkpointing and torch.compile (switches), then FSDP2 when distributed:
    every block is its own `fully_shard` unit (its parameters are gathered just for its own
    forward and backward) and the root holds the rest (patch embedding, norms, tokens).
    Parameter names are unchanged, so checkpoints load into an unwrapped model and back."""
    model.encoder.grad_checkpointing = model.predictor.grad_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        for block in transformer_blocks(model):
            block.compile()
    if world.distributed:
        # The predictor's output is a view (nn.Linear on 3-D input), which FSDP warns about because an
        # in-place op on it would skip a hook; nothing modifies the student's outputs in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        _shard(model, transformer_blocks(model), cfg, world, cfg.distributed.reshard_after_forward)
    return model


def prepare_target(target: nn.Module, cfg: Config, world: World) -> nn.Module:
    """The EMA target encoder, sharded like the student's encoder when distributed. Its
    gathered parameters are always freed after its forward (`reshard_target`): it has no
    backward that would free them, and the EMA update changes the shards in between."""
    if cfg.train.compile:
        for block in target.blocks:
            block.compile()
    if world.distributed:
        _shard(target, list(target.blocks), cfg, world, reshard_after_forward=True)
    return target


def reshard_target(target: nn.Module) -> None:
    """Free the target's gathered root parameters (FSDP2 keeps a root's after its forward)."""
    reshard = getattr(target, "reshard", None)
    if reshard is not None:
        reshard()


def _shard(model: nn.Module, blocks: list[nn.Module], cfg: Config, world: World, reshard_after_forward: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.train.precision], reduce_dtype=DTYPES[cfg.distributed.reduce_dtype]
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Under FSDP, skip the gradient reduce-scatter on all but the last micro-batch of a step."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def split_sizes(n: int, parts: int) -> list[int]:
    """`n` samples in `parts` near-equal micro-batches (the first ones one larger)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def micro_batches_per_step(cfg: Config, world_size: int) -> int:
    """Forward/backward passes per rank and step; the same on every rank, as FSDP needs."""
    share = cfg.data.batch_size // world_size
    return math.ceil(share / cfg.data.micro_batch_size) if cfg.data.micro_batch_size else 1
