"""Process-group setup for torchrun, Slurm (`srun`) and plain single-process runs.

`detect_env` is a pure function of an environment mapping, so every launcher case is unit
tested without starting processes; `init_distributed` is the only part with side effects.

Rules (after DINOv2's distributed init, without its known pitfalls):

- torchrun (`RANK` set): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` are
  taken as they are. They must all be set (for a world of one only `WORLD_SIZE` is needed).
- Slurm (`SLURM_PROCID` and `SLURM_NTASKS` set, and `SLURM_NTASKS > 1` or an srun step, i.e.
  `SLURM_STEP_ID` set): rank = `SLURM_PROCID`, world = `SLURM_NTASKS`, local rank =
  `SLURM_LOCALID`. The master address is the FIRST host of `SLURM_STEP_NODELIST` (the nodes of
  this srun step, where task 0 runs) or, outside a step, of `SLURM_JOB_NODELIST`. The master
  port is derived from the job id: ``10000 + SLURM_JOB_ID % 20000`` (range 10000-29999, below
  the usual Linux ephemeral range 32768+), so every task of a job computes the same port
  without talking to the others, and two jobs sharing a node differ unless their ids are
  20000 apart. `MASTER_ADDR`/`MASTER_PORT` inherited from the submitting shell are ignored
  under Slurm: `MASTER_ADDR=$HOSTNAME` and hard-coded ports are what make multi-node runs hang.
- Anything else is a single process (rank 0 of 1).

A half-set environment (e.g. `RANK` without `WORLD_SIZE`, `WORLD_SIZE=4` without `RANK`,
`SLURM_PROCID` without `SLURM_NTASKS`) raises `UserError` instead of silently training alone.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from usjepa.errors import UserError

log = logging.getLogger(__name__)

Source = Literal["torchrun", "slurm", "single"]

SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. `master_addr`/`master_port` are None for a single process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    source: Source

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, master_addr=None, master_port=None, source="single")


# --------------------------------------------------------------------------- Slurm hostlists

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise UserError(f"bad Slurm nodelist {text!r}: nested '[' at position {i}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise UserError(f"bad Slurm nodelist {text!r}: unmatched ']' at position {i}")
            depth = 0
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise UserError(f"bad Slurm nodelist {text!r}: unclosed '['")
    parts.append(text[start:])
    return parts


def _expand_brackets(inner: str, whole: str) -> list[str]:
    """`01-03,07` -> ['01', '02', '03', '07']; the width of a range's lower bound is kept."""
    out: list[str] = []
    for item in inner.split(","):
        item = item.strip()
        m = _RANGE.match(item)
        if not m:
            raise UserError(f"bad Slurm nodelist {whole!r}: {item!r} inside [...] is not N or N-M")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise UserError(f"bad Slurm nodelist {whole!r}: range {item!r} runs backwards")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_host(expr: str, whole: str) -> list[str]:
    """One host expression, possibly with several bracket groups: `r[1-2]n[1-2]` -> 4 hosts."""
    hosts = [""]
    pos = 0
    for m in re.finditer(r"\[([^\]]*)\]", expr):
        literal = expr[pos : m.start()]
        values = _expand_brackets(m.group(1), whole)
        hosts = [h + literal + v for h in hosts for v in values]
        pos = m.end()
    tail = expr[pos:]
    return [h + tail for h in hosts]


def expand_nodelist(text: str) -> list[str]:
    """Expand a Slurm hostlist expression into host names, in order.

    `n1` -> [n1]; `n[1-3]` -> [n1, n2, n3]; `gpu[01-03,07]` -> [gpu01, gpu02, gpu03, gpu07];
    `a[1-2]-ib,b3` -> [a1-ib, a2-ib, b3]; `node[001-002]x` -> [node001x, node002x].
    Commas inside brackets do not split hosts; zero padding of a range's lower bound is kept;
    several bracket groups in one name expand as a product. Malformed text raises `UserError`.
    """
    text = text.strip()
    if not text:
        raise UserError("empty Slurm nodelist: expected host names such as 'node[01-04]'")
    hosts: list[str] = []
    for part in _split_top_level(text):
        part = part.strip()
        if not part:
            raise UserError(f"bad Slurm nodelist {text!r}: empty host between commas")
        hosts.extend(_expand_host(part, text))
    return hosts


# --------------------------------------------------------------------------- environment


def _int(environ: Mapping[str, str], name: str, *, minimum: int = 0) -> int:
    raw = environ[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise UserError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _missing(environ: Mapping[str, str], names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not environ.get(n, "").strip()]


def _set(environ: Mapping[str, str], name: str) -> bool:
    return bool(environ.get(name, "").strip())


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port every task of Slurm job `job_id` derives on its own."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _check_rank(rank: int, world: int, rank_name: str, world_name: str) -> None:
    if rank >= world:
        raise UserError(
            f"{rank_name}={rank} is not below {world_name}={world}: the launcher environment is inconsistent"
        )


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    if not _set(environ, "WORLD_SIZE"):
        raise UserError(
            "RANK is set but WORLD_SIZE is not: launch with torchrun (which sets RANK, WORLD_SIZE, "
            "LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or unset RANK for a single-process run"
        )
    world = _int(environ, "WORLD_SIZE", minimum=1)
    rank = _int(environ, "RANK")
    _check_rank(rank, world, "RANK", "WORLD_SIZE")
    if world == 1:
        local = _int(environ, "LOCAL_RANK") if _set(environ, "LOCAL_RANK") else 0
        return DistEnv(
            rank=rank,
            world_size=1,
            local_rank=local,
            master_addr=environ.get("MASTER_ADDR") or None,
            master_port=_int(environ, "MASTER_PORT", minimum=1) if _set(environ, "MASTER_PORT") else None,
            source="torchrun",
        )
    missing = _missing(environ, ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
    if missing:
        raise UserError(
            f"RANK and WORLD_SIZE={world} are set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun, which sets all of "
            f"{', '.join(_TORCHRUN_VARS)}, or set the missing variables"
        )
    port = _int(environ, "MASTER_PORT", minimum=1)
    if port > 65535:
        raise UserError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=_int(environ, "LOCAL_RANK"),
        master_addr=environ["MASTER_ADDR"].strip(),
        master_port=port,
        source="torchrun",
    )


def _from_slurm(environ: Mapping[str, str]) -> DistEnv | None:
    """The Slurm environment, or None when this is a Slurm allocation but not a multi-task step."""
    world = _int(environ, "SLURM_NTASKS", minimum=1)
    rank = _int(environ, "SLURM_PROCID")
    _check_rank(rank, world, "SLURM_PROCID", "SLURM_NTASKS")
    if world == 1 and not _set(environ, "SLURM_STEP_ID"):
        return None  # a one-task batch script or salloc shell: a plain single process
    if world == 1:
        return DistEnv(
            rank=0,
            world_size=1,
            local_rank=_int(environ, "SLURM_LOCALID") if _set(environ, "SLURM_LOCALID") else 0,
            master_addr=None,
            master_port=None,
            source="slurm",
        )
    missing = _missing(environ, ("SLURM_LOCALID", "SLURM_JOB_ID"))
    if not (_set(environ, "SLURM_STEP_NODELIST") or _set(environ, "SLURM_JOB_NODELIST")):
        missing.append("SLURM_JOB_NODELIST (or SLURM_STEP_NODELIST)")
    if missing:
        raise UserError(
            f"SLURM_PROCID and SLURM_NTASKS={world} are set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: start the tasks with srun inside a Slurm job "
            "(or use launch/submit.py), or unset SLURM_PROCID/SLURM_NTASKS for a single process"
        )
    nodelist_var = "SLURM_STEP_NODELIST" if _set(environ, "SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    master = expand_nodelist(environ[nodelist_var])[0]
    job_id = _int(environ, "SLURM_JOB_ID")
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=_int(environ, "SLURM_LOCALID"),
        master_addr=master,
        master_port=slurm_master_port(job_id),
        source="slurm",
    )


def detect_env(environ: Mapping[str, str]) -> DistEnv:
    """Work out rank, world size and rendezvous address from `environ` (pure; see module docstring)."""
    if _set(environ, "RANK"):
        return _from_torchrun(environ)
    if _set(environ, "WORLD_SIZE") and _int(environ, "WORLD_SIZE", minimum=1) > 1:
        raise UserError(
            f"WORLD_SIZE={environ['WORLD_SIZE'].strip()} is set but RANK is not: launch with torchrun "
            "(which sets RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT too) or unset WORLD_SIZE"
        )
    has_procid, has_ntasks = _set(environ, "SLURM_PROCID"), _set(environ, "SLURM_NTASKS")
    if has_procid and not has_ntasks:
        raise UserError(
            "SLURM_PROCID is set but SLURM_NTASKS is not: start the tasks with srun inside a Slurm job "
            "(which sets both), or unset SLURM_PROCID for a single-process run"
        )
    # SLURM_NTASKS alone is an salloc shell or a batch script outside srun: one process.
    if has_procid and has_ntasks:
        env = _from_slurm(environ)
        if env is not None:
            return env
    return SINGLE


# --------------------------------------------------------------------------- process group


def init_distributed(device: torch.device, env: DistEnv | None = None, timeout_s: int = 600) -> DistEnv:
    """Join the process group described by `env` (default: `detect_env(os.environ)`).

    World size 1: nothing happens. Otherwise MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK are
    exported when missing (under Slurm the derived values replace inherited ones), the CUDA device is
    set to `local_rank`, and `init_process_group` runs with nccl on CUDA, gloo otherwise. Calling it
    again in an initialized process returns the env without re-initializing.
    """
    env = detect_env(os.environ) if env is None else env
    if env.world_size <= 1:
        return env
    if env.master_addr is None or env.master_port is None:
        raise UserError(f"a {env.world_size}-process run needs a master address and port; got {env}")
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise UserError(
                f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) already exists "
                f"and does not match {env}"
            )
        return env
    wanted = {
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
    }
    for name, value in wanted.items():
        old = os.environ.get(name)
        if old is None or env.source != "torchrun":
            if old is not None and old != value:
                log.warning("replacing inherited %s=%s with %s (from the %s environment)", name, old, value, env.source)
            os.environ[name] = value
    if device.type == "cuda":
        torch.cuda.set_device(cuda_index(env.local_rank))
        backend = "nccl"
    else:
        backend = "gloo"
    log.info(
        "joining %s process group: rank %d of %d via %s:%d (%s)",
        backend,
        env.rank,
        env.world_size,
        env.master_addr,
        env.master_port,
        env.source,
    )
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return env


def cuda_index(local_rank: int) -> int:
    """The GPU of a local rank: its own index, or 0 where each task sees only its own GPU
    (Slurm's --gpus-per-task / CUDA_VISIBLE_DEVICES per task)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank >= count:
        raise UserError(
            f"local rank {local_rank} has no GPU: this node shows {count}; "
            "start at most one task per GPU (e.g. srun --ntasks-per-node / torchrun --nproc_per_node)"
        )
    return local_rank


def shutdown_distributed() -> None:
    """Destroy the process group if there is one."""
    if in_process_group():
        dist.destroy_process_group()


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True on rank 0, and in a process without a process group."""
    return not in_process_group() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for all ranks; a no-op without a process group."""
    if in_process_group():
        dist.barrier()
