"""Atomic writes: whole files only, with the permissions a plain open() gives."""

import os
import stat

from usjepa.fileio import atomic_write_text


def test_atomic_files_get_the_usual_mode_not_mkstemps_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "latest", "step_000010")
    finally:
        os.umask(old)
    assert path.read_text() == "step_000010"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by the group: shared run dirs
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temp file left behind
