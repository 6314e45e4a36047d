"""Loader faults in a real `usjepa train` process: a loader worker killed from outside (the
OOM killer's kill -9) ends the run with one line and every process gone; with
data.on_bad_shard=skip each distinct warning is said once per run, whoever read the data,
with a count at the end of the run where it repeated."""

import collections
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from test_unattended import finish, group_alive, last_line, logged_steps, start

from usjepa.shardset.manifest import load_manifest

pytestmark = pytest.mark.slow  # each test starts `usjepa train` processes


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (loader workers are forked: they run its command)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended
            continue
    return found


def loader_workers(pid: int) -> list[int]:
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    workers = []
    for child in children(pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes() == command:
                workers.append(child)
        except FileNotFoundError:
            continue
    return workers


def test_a_loader_worker_killed_from_outside_is_one_line_and_every_process_ends(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    proc = start(
        [
            *tiny_overrides,
            f"run.dir={run}",
            "data.num_workers=2",
            "data.streams=2",
            "train.total_steps=100000",
            "checkpoint.every_steps=1000",
        ]
    )
    deadline = time.monotonic() + 60
    while not (logged_steps(run) and len(workers := loader_workers(proc.pid)) == 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    os.kill(workers[0], signal.SIGKILL)  # what the OOM killer does
    code, err = finish(proc, timeout=30)
    assert code == 2, err[-2000:]
    assert last_line(err) == (
        f"usjepa train: error: a data loader worker (pid {workers[0]}) died: killed by signal 9 (out of memory?); "
        "the last checkpoint is intact, rerun the same command to resume (perhaps with fewer data.num_workers)"
    )
    assert "Traceback" not in err
    time.sleep(0.5)
    assert not group_alive(proc.pid), "a loader worker outlived the run"


def _flip_a_byte_of_the_first_train_shard(shards: Path, out: Path) -> Path:
    shutil.copytree(shards, out)
    first = load_manifest(out).shard_paths("train")[0]
    data = bytearray(first.read_bytes())
    data[600] ^= 0xFF  # same size: only the checksum (and the decoder) can tell
    first.write_bytes(bytes(data))
    return first


@pytest.mark.parametrize("workers", [0, 2])
def test_each_skipped_problem_is_said_once_per_run_with_a_count(shards, tiny_overrides, tmp_path, workers):
    first = _flip_a_byte_of_the_first_train_shard(shards, tmp_path / "changed")
    code, err = finish(
        start(
            [
                *tiny_overrides,
                f"data.shards={tmp_path / 'changed'}",
                "data.on_bad_shard=skip",
                f"data.num_workers={workers}",
                "data.streams=2",
                "train.total_steps=60",  # several epochs of every stream
                "train.validate=false",
                f"run.dir={tmp_path / 'r'}",
            ]
        ),
        timeout=90,
    )
    assert code == 0, err[-2000:]
    lines = collections.Counter(line for line in err.splitlines() if line.startswith("usjepa: "))
    assert all(n == 1 for n in lines.values()), {line: n for line, n in lines.items() if n > 1}
    said = [line for line in lines if not line.endswith(" times in this run")]
    counted = {}  # what was said more than once -> how often
    for line in lines:
        if line.endswith(" times in this run"):
            text, _, count = line.removesuffix(" times in this run").rpartition(": ")
            assert text in said, line
            counted[text] = int(count)
    changed = f"usjepa: shard {first}: sha256 differs from the manifest: read, its undecodable samples skipped"
    assert [line for line in said if line.startswith(changed)] == [f"{changed} (data.on_bad_shard=skip)"]
    corrupt = [line for line in said if line.startswith("usjepa: skipping corrupt sample: ")]
    assert len(corrupt) == 1, err[-2000:]
    # Once per epoch that read the shard, several in 60 steps: said at the end with the count.
    assert counted.get(corrupt[0], 0) > 1, err[-2000:]
    assert all(n > 1 for n in counted.values())
