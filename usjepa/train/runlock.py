"""One run per run dir: rank 0 holds an exclusive lock on RUN/.lock while the run trains.

The lock is `flock`, so it dies with the process that holds it (a killed or crashed run
leaves no stale lock; its host and pid stay in the file for the next owner's error message).
Under torchrun or Slurm only rank 0 takes it, and every rank learns whether it got it, so a
refused launch ends on every rank with the same one-line error.

The lock is the first thing a start takes, before it reads its data or its checkpoints, so a
second run on the same dir is refused at once. A start refused after taking it (a setting a
resume cannot change, a missing shard, a bad teacher) leaves the run dir as it found it: the
lock file's previous text is put back (or the file removed where this start created it), and
so are the folders the start created, where they are still empty.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from usjepa.errors import UserError
from usjepa.rundir import make_run_dir
from usjepa.train.parallel import World

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, fd: int | None, path: Path | None = None, before: bytes | None = None, created=()):
        self._fd = fd
        self._path = path
        self._before = before  # the lock file's text before this start took it; None: it created the file
        self._created = tuple(created)  # folders this start created, outermost first

    def release(self, undo: bool = False) -> None:
        """Let go of the run dir; with `undo` (a refused start) leave it as it was found."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if undo:
                self._undo(fd)
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def _undo(self, fd: int) -> None:
        # Still under the lock: whoever opens the file next finds the old text, or no file.
        try:
            if self._before is None:
                self._path.unlink(missing_ok=True)
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, self._before, 0)
        except OSError:
            pass  # best effort: the refusal being reported matters more
        _remove(self._created)

    # A Trainer built without train() (tools, tests) lets go of the run dir when it is dropped.
    def __del__(self) -> None:
        self.release()


def _open(path: Path) -> tuple[int, bool]:
    """A read-write descriptor of the lock file, and whether this call created it."""
    try:
        return os.open(path, os.O_RDWR), False
    except FileNotFoundError:
        pass
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:  # another start created it in between
        return os.open(path, os.O_RDWR), False


def _read(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


def _take(run_dir: Path) -> tuple[int | None, bytes | None, str]:
    """(descriptor holding the lock, the file's text before, "") or (None, None, why not)."""
    path = run_dir / LOCK_NAME
    while True:
        try:
            fd, created = _open(path)
        except OSError as e:
            return (
                None,
                None,
                (
                    f"run.dir={run_dir}: cannot open its lock file {path} ({e.strerror or e}); a run writes its "
                    "checkpoints and logs there: make it writable, or choose another run.dir"
                ),
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return (
                None,
                None,
                (
                    f"run.dir={run_dir} is in use by the run of {owner}; wait for it to finish or stop it, or choose "
                    "another run.dir"
                ),
            )
        # A refused start removes a lock file it created: the file locked must still be the one named.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        before = None if created else _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%F %T')}\n".encode(), 0)
    except OSError as e:
        if created:
            path.unlink(missing_ok=True)
        os.close(fd)
        return (
            None,
            None,
            (
                f"run.dir={run_dir}: cannot write its lock file {path} ({e.strerror or e}); check the free disk space, "
                "then rerun"
            ),
        )
    return fd, before, ""


def hold_run_dir(run_dir: Path, world: World) -> RunLock:
    """Create `run_dir` and lock it for this run (rank 0 does both), or raise on every rank if
    it cannot be created or is taken. Release with `undo=True` where the start is refused."""
    run_dir = Path(run_dir)
    fd, before, refused, created = None, None, "", []
    if world.is_main:
        try:
            created = make_run_dir(run_dir)
        except UserError as e:
            refused = str(e)
        else:
            fd, before, refused = _take(run_dir)
            if refused:
                _remove(created)
    refused = world.gather_objects(refused)[0]
    if refused:
        raise UserError(refused)
    return RunLock(fd, run_dir / LOCK_NAME, before, created)


def _remove(created) -> None:
    """Remove the folders a start created (outermost first in `created`) where still empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break
