"""Unattended runs, as real `usjepa train` processes: a failed run exits at once with one line,
a run dir has one owner, unresumable changes are refused before anything is written, bad
shards stop the run unless skipped, TensorBoard holds each step once after kill -9 and
resume, and a run stopped by a signal says so in its exit status."""

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from usjepa import rundir
from usjepa.shardset.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test starts `usjepa train` processes


def start(overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "usjepa", "train", "configs/demo.yaml", *overrides],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its loader workers too, so that the test can see them all go
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Exit status and stderr; fails (and kills the group) if it does not end in `timeout`."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not end within {timeout} s")
    return proc.returncode, err


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def logged_steps(run: Path) -> collections.Counter:
    """How often each step's train/loss is in the run's event files, read raw (no purging)."""
    steps = collections.Counter()
    for path in sorted((run / "tb").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps.update(event.step for v in event.summary.value if v.tag == "train/loss")
    return steps


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_set_without_its_tars_is_one_line_and_every_process_ends(shards, tiny_overrides, tmp_path, workers):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(shards / "manifest.json", bare)
    proc = start([*tiny_overrides, f"data.shards={bare}", f"data.num_workers={workers}", f"run.dir={tmp_path / 'r'}"])
    code, err = finish(proc, timeout=60)
    assert code == 2, err[-2000:]
    assert last_line(err).startswith(f"usjepa train: error: {bare}: ")
    assert "shards the manifest lists cannot be read: train-000000.tar (missing)" in last_line(err)
    assert "Traceback" not in err
    time.sleep(0.5)
    assert not group_alive(proc.pid), "a loader worker outlived the run"


def test_a_bad_shard_found_by_a_loader_worker_ends_the_run(shards, tiny_overrides, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(shards, changed)
    first = load_manifest(changed).shard_paths("train")[0]
    data = bytearray(first.read_bytes())
    data[600] ^= 0xFF  # same size: only the checksum can tell
    first.write_bytes(bytes(data))
    args = [*tiny_overrides, f"data.shards={changed}", "data.num_workers=2", "data.streams=2"]
    proc = start([*args, f"run.dir={tmp_path / 'r'}"])
    code, err = finish(proc, timeout=60)
    assert code == 2, err[-2000:]
    assert last_line(err) == (
        f"usjepa train: error: shard {first}: sha256 differs from the manifest; rebuild or restore it "
        "(usjepa shards verify checks a set), or set data.on_bad_shard=skip to train on what can be read"
    )
    time.sleep(0.5)
    assert not group_alive(proc.pid)
    code, err = finish(start([*args, "data.on_bad_shard=skip", "train.total_steps=4", f"run.dir={tmp_path / 's'}"]))
    assert code == 0, err[-2000:]
    assert err.count("sha256 differs from the manifest: read, its undecodable samples skipped") == 1


def test_a_missing_shard_is_left_out_only_when_asked(shards, tiny_overrides, tmp_path):
    holed = tmp_path / "holed"
    shutil.copytree(shards, holed)
    paths = load_manifest(holed).shard_paths("train")
    paths[1].unlink()
    code, err = finish(start([*tiny_overrides, f"data.shards={holed}", f"run.dir={tmp_path / 'r'}"]))
    assert code == 2 and f"1 of the {len(paths)} 'train' shards" in last_line(err), err[-2000:]
    assert not (tmp_path / "r" / "tb").exists()  # stopped before training
    overrides = [*tiny_overrides, f"data.shards={holed}", "data.on_bad_shard=skip", "train.total_steps=4"]
    code, err = finish(start([*overrides, f"run.dir={tmp_path / 's'}"]))
    assert code == 0, err[-2000:]
    assert f"skipping 1 of {len(paths)} 'train' shards: {paths[1].name} (missing)" in err


def test_a_second_run_in_the_same_run_dir_is_refused_naming_the_owner(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    first = start([*tiny_overrides, f"run.dir={run}", "train.total_steps=100000", "checkpoint.every_steps=1000"])
    deadline = time.monotonic() + 120
    while not (run / "tb").is_dir():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.1)
    record = (run / "resolved_config.yaml").read_text()
    code, err = finish(start([*tiny_overrides, f"run.dir={run}", "train.total_steps=100000", "optim.lr=5e-4"]))
    assert code == 2
    assert last_line(err) == (
        f"usjepa train: error: run.dir={run} is in use by the run of host {os.uname().nodename} pid {first.pid} "
        f"since {(run / '.lock').read_text().split(' since ')[1].strip()}; wait for it to finish or stop it, or "
        "choose another run.dir"
    )
    assert (run / "resolved_config.yaml").read_text() == record
    os.killpg(first.pid, signal.SIGKILL)  # a dead owner: its lock goes with it
    first.wait()
    code, err = finish(start([*tiny_overrides, f"run.dir={run}", "train.total_steps=3"]))
    assert code == 0, err[-2000:]


def test_an_unresumable_change_is_refused_before_anything_is_written(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    code, err = finish(start([*tiny_overrides, f"run.dir={run}", "train.total_steps=4", "run.stop_at_step=2"]))
    assert code == 0, err[-2000:]

    def record():  # what the run wrote (the lock file names whoever held it last)
        return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}

    before = record()
    code, err = finish(
        start([*tiny_overrides, f"run.dir={run}", "train.total_steps=4", "model.embed_dim=48", "data.image_size=48"])
    )
    assert code == 2, err[-2000:]
    assert last_line(err) == (
        f"usjepa train: error: {run} has checkpoints of other settings, which a resume cannot change "
        "(data.image_size: 32 -> 48; model.embed_dim: 32 -> 48); restore them, or start a new run.dir"
    )
    assert record() == before
    # A change a resume can take is recorded once the resume is accepted.
    code, err = finish(start([*tiny_overrides, f"run.dir={run}", "train.total_steps=4", "log.every_steps=2"]))
    assert code == 0, err[-2000:]
    assert yaml.safe_load((run / "resolved_config.yaml").read_text())["log"]["every_steps"] == 2


def test_a_run_dir_that_is_a_file_is_one_line(tiny_overrides, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    code, err = finish(start([*tiny_overrides, f"run.dir={tmp_path / 'taken'}"]))
    assert code == 2
    assert last_line(err) == (
        f"usjepa train: error: run.dir={tmp_path / 'taken'} is a file; name a folder for the run (it is created)"
    )


def test_tensorboard_holds_each_step_once_after_kills_and_resumes(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    args = [
        *tiny_overrides,
        f"run.dir={run}",
        "train.total_steps=40",
        "checkpoint.every_steps=5",
        "train.validate=false",
    ]
    for kill_after in ("step_000010", "step_000025"):  # the first resume, then a later one
        proc = start(args)
        latest = run / "checkpoints" / "latest"
        while not (latest.is_file() and latest.read_text().strip() == kill_after):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.01)
        step = int(kill_after.removeprefix("step_"))
        while max(logged_steps(run), default=0) < step + 2:  # steps logged after the checkpoint
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    code, err = finish(start(args))
    assert code == 0, err[-2000:]
    steps = logged_steps(run)
    assert sorted(steps) == list(range(1, 41))
    assert set(steps.values()) == {1}, {s: n for s, n in steps.items() if n > 1}


def test_a_run_stopped_by_a_signal_exits_3_and_resumes(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    args = [*tiny_overrides, f"run.dir={run}", "train.total_steps=100000", "checkpoint.every_steps=1000"]
    proc = start(args)
    while not logged_steps(run):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 3, err[-2000:]
    saved = rundir.read_meta(rundir.latest_checkpoint(run))["step"]
    assert f"SIGTERM received; saved step {saved} and stopped" in err
    code, err = finish(start([*args[:-2], f"train.total_steps={saved + 2}"]))
    assert code == 0 and f"resuming {run} from step {saved}" in err, err[-2000:]


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_run_resumes(tiny_overrides, tmp_path):
    import resource

    def limit_file_size():  # in the child: writes past 100 kB fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    run = tmp_path / "run"
    args = [*tiny_overrides, f"run.dir={run}", "train.total_steps=4", "checkpoint.every_steps=2"]
    limited = subprocess.run(
        [sys.executable, "-m", "usjepa", "train", "configs/demo.yaml", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size,
    )
    assert limited.returncode == 2, limited.stderr[-2000:]
    line = last_line(limited.stderr)
    assert line.startswith(f"usjepa train: error: cannot write checkpoint {run / 'checkpoints' / 'step_000002'} (")
    assert line.endswith(
        "); check the free disk space and file-size limit (ulimit -f), then rerun: the run resumes from the start, "
        "which is intact"
    )
    assert "Traceback" not in limited.stderr
    assert not list((run / "checkpoints").glob(".step_*"))  # no half-written checkpoint left
    code, err = finish(start(args))
    assert code == 0, err[-2000:]
    assert rundir.read_meta(rundir.latest_checkpoint(run))["step"] == 4


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_garbage_teacher_file_is_one_line(tiny_overrides, tmp_path, suffix):
    garbage = tmp_path / f"teacher{suffix}"
    garbage.write_bytes(bytes(range(256)) * 20)
    code, err = finish(start([*tiny_overrides, f"teacher.checkpoint={garbage}", f"run.dir={tmp_path / 'r'}"]))
    assert code == 2, err[-2000:]
    assert last_line(err).startswith(f"usjepa train: error: {garbage}: not a readable checkpoint (")
    assert "Traceback" not in err
