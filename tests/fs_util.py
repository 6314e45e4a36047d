"""A real read-only folder for tests of write failures: a read-only bind mount of the folder
onto itself (root, as in CI), since permission bits do not stop root."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only(folder: Path):
    """While inside, `folder` is on a read-only mount; skips the test where mounting is not allowed."""
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount {folder} read-only here: {mounted.stderr.strip()}")
    try:
        remounted = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, text=True, check=False
        )
        if remounted.returncode != 0:
            pytest.skip(f"cannot remount {folder} read-only here: {remounted.stderr.strip()}")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
