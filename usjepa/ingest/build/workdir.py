"""`OUT/.work`: one result file per processed item, under an exclusive lock, keyed by the work
fingerprint (every setting that changes a result), the item and its file's size and mtime, so
an interrupted build resumes and results of other settings never mix
(docs/data.md#resumable-and-parallel-builds)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

from usjepa.config import changed_settings, flatten
from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text
from usjepa.ingest.sources.base import SourceItem

WORK_DIR = ".work"
WORK_FORMAT = 1  # bump when a result file's content or meaning changes
RESULT_MAGIC = b"USJWRES1"
_FIXED = struct.Struct("<IIQ")  # header length, header crc32, payload length


@contextmanager
def naming(path):
    """Put `path` into an OSError raised while writing it: a failed write() names no file, and the
    build's error for a full disk or a file-size limit says which file could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


class WorkDir:
    """OUT/.work: settings of the build that made it, an exclusive lock, result files."""

    def __init__(self, out: Path, fingerprint: dict, overwrite: bool):
        self.dir = out / WORK_DIR
        self.items = self.dir / "items"
        self.fingerprint = fingerprint
        self.digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        settings_path = self.dir / "settings.json"
        previous = None
        if settings_path.is_file():
            try:
                previous = json.loads(settings_path.read_text(encoding="utf-8")).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                previous = None
        if previous is not None and previous != fingerprint:
            if not overwrite:
                old, new = flatten(previous), flatten(fingerprint)
                diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed_settings(previous, fingerprint)]
                self.release()
                raise UserError(
                    f"{self.dir} holds the unfinished work of a build with other settings ({'; '.join(diffs[:5])}); "
                    "rerun with the same settings to resume it, or pass --overwrite to discard it and start over"
                )
            previous = None
        if previous is None:  # new, changed (with --overwrite) or unreadable: start afresh
            shutil.rmtree(self.items, ignore_errors=True)
            with naming(settings_path):
                atomic_write_text(
                    settings_path, json.dumps({"fingerprint": fingerprint}, indent=2, sort_keys=True) + "\n"
                )
        self.items.mkdir(exist_ok=True)
        for i in range(256):
            (self.items / f"{i:02x}").mkdir(exist_ok=True)

    def _lock(self) -> None:
        self._lock_file = open(self.dir / "lock", "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            # lockf (POSIX record lock): owned by this process only, not by the workers
            fcntl.lockf(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise UserError(
                f"another `usjepa shards build` is writing into {self.dir.parent} (lock {self.dir / 'lock'} is "
                "held); wait for it to finish or choose another OUT"
            ) from None

    def release(self) -> None:
        if not self._lock_file.closed:
            self._lock_file.close()

    def path_of(self, item: SourceItem) -> Path:
        signature = ""
        item_path = getattr(item, "path", None)
        if isinstance(item_path, (str, os.PathLike)):
            try:
                st = os.stat(item_path)
                signature = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                signature = "missing"
        h = hashlib.sha256(f"{self.digest}\0{item.key}\0{signature}".encode()).hexdigest()[:40]
        return self.items / h[:2] / f"{h[2:]}.res"

    def count_results(self) -> int:
        return sum(1 for sub in self.items.iterdir() if sub.is_dir() for p in sub.iterdir() if p.suffix == ".res")

    def remove(self) -> None:
        self.release()
        shutil.rmtree(self.dir, ignore_errors=True)


def write_result(path: Path, header: dict, payload: bytes) -> int:
    """Write a result file atomically (temporary name, rename); returns the payload's offset.

    Layout: magic, (header length, header crc32, payload length), header JSON, payload. No
    fsync per file: a killed process leaves whole files (the rename is atomic); after a
    power loss a damaged file fails its length or crc check and is simply redone."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with naming(path), open(tmp, "wb") as f:
            f.write(RESULT_MAGIC + _FIXED.pack(len(head), zlib.crc32(head), len(payload)))
            f.write(head)
            f.write(payload)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: leave no partial file behind
        raise
    os.replace(tmp, path)
    return len(RESULT_MAGIC) + _FIXED.size + len(head)


def read_result(path: Path) -> tuple[dict, int] | None:
    """(header, payload offset) of a complete, intact result file; None when it is missing
    or damaged (a damaged one is deleted so it is redone)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        fixed = f.read(len(RESULT_MAGIC) + _FIXED.size)
        ok = len(fixed) == len(RESULT_MAGIC) + _FIXED.size and fixed.startswith(RESULT_MAGIC)
        if ok:
            head_len, head_crc, payload_len = _FIXED.unpack(fixed[len(RESULT_MAGIC) :])
            head = f.read(head_len)
            base = len(fixed) + head_len
            ok = (
                len(head) == head_len
                and zlib.crc32(head) == head_crc
                and os.fstat(f.fileno()).st_size == base + payload_len
            )
    if not ok:
        path.unlink(missing_ok=True)
        return None
    return json.loads(head), base
