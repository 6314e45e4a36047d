"""One run per run dir: rank 0 holds an exclusive lock on RUN/.lock while the run trains.

The lock is `flock`, so it dies with the process that holds it (a killed or crashed run
leaves no stale lock; its host and pid stay in the file for the next owner's error message).
Under torchrun or Slurm only rank 0 takes it, and every rank learns whether it got it, so a
refused launch ends on every rank with the same one-line error.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from usjepa.errors import UserError
from usjepa.train.parallel import World

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, fd: int | None):
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    # A Trainer built without train() (tools, tests) lets go of the run dir when it is dropped.
    __del__ = release


def _take(run_dir: Path) -> tuple[int | None, str]:
    """(descriptor holding the lock, "") or (None, why not)."""
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, (
            f"run.dir={run_dir} is in use by the run of {owner}; wait for it to finish or stop it, or choose "
            "another run.dir"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%F %T')}\n".encode(), 0)
    return fd, ""


def hold_run_dir(run_dir: Path, world: World) -> RunLock:
    """Lock `run_dir` for this run (rank 0 holds it), or raise on every rank if it is taken."""
    fd, refused = _take(Path(run_dir)) if world.is_main else (None, "")
    refused = world.gather_objects(refused)[0]
    if refused:
        raise UserError(refused)
    return RunLock(fd)
