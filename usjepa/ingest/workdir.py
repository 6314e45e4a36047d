"""`OUT/.work`: where phase 1 keeps one result file per item so an interrupted build resumes.

It holds `settings.json` (the work fingerprint: every setting that changes a result), an
exclusive lock (one build per OUT) and `items/<h[:2]>/<h>.res`, where h hashes the
fingerprint, the item key and the item file's size and mtime: a changed input or setting
never reuses an old result. A rerun with a different fingerprint is refused (or, with
--overwrite, starts over) so results of different settings never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from usjepa.config import changed_settings, flatten
from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text
from usjepa.ingest.sources import SourceItem

WORK_DIR = ".work"


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
            atomic_write_text(settings_path, json.dumps({"fingerprint": fingerprint}, indent=2, sort_keys=True) + "\n")
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
