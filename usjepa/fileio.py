"""Atomic file writes (a reader, or a resumed job, never sees half a file), output folders made
with one-line errors, and file checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from usjepa.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(f)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would have,
        # so checkpoints, manifests and exports can be shared on a cluster as usual.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def make_folder(path: str | os.PathLike, what: str, fix: str) -> Path:
    """`mkdir -p` whose failure is one line: `cannot create WHAT PATH (why); FIX`, naming the file
    that stands where a folder should be when that is the cause."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocking = next((p for p in (path, *path.parents) if p.exists()), None)
        why = f"{blocking} is a file, not a folder" if blocking and not blocking.is_dir() else exc.strerror
        raise UserError(f"cannot create {what} {path} ({why}); {fix}") from None
    return path


def files_sha256(paths: list[Path]) -> str:
    """sha256 of the contents of `paths` in name order (of one file: its plain sha256)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
