"""Unattended runs, as real `usjepa train` processes: a failed run exits at once with one line,
a run dir has one owner, unresumable changes are refused before anything is written, bad
shards stop the run unless skipped, TensorBoard holds each step once after kill -9 and
resume, and a run stopped by a signal says so in its exit status."""

import collections
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fs_util import read_only
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


def run_with_file_size_limit(args: list[str], limit: int, timeout: float) -> subprocess.CompletedProcess:
    """`usjepa train` as under `ulimit -f`: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored)."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "usjepa", "train", "configs/demo.yaml", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit_file_size,
    )


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
    assert not (tmp_path / "r").exists()  # a refused start leaves no run dir (nor its lock) behind
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
    owner = (run / ".lock").read_text()
    # Refused before it looks at its data: shards that do not exist are not what it reports.
    second = [*tiny_overrides, f"run.dir={run}", "train.total_steps=100000", "optim.lr=5e-4"]
    code, err = finish(start([*second, f"data.shards={tmp_path / 'no-such-shards'}"]))
    assert code == 2
    assert err.count("\n") == 1, err  # the error, and nothing about loading shards or models before it
    assert last_line(err) == (
        f"usjepa train: error: run.dir={run} is in use by the run of host {os.uname().nodename} pid {first.pid} "
        f"since {owner.split(' since ')[1].strip()}; wait for it to finish or stop it, or "
        "choose another run.dir"
    )
    assert (run / "resolved_config.yaml").read_text() == record
    assert (run / ".lock").read_text() == owner
    os.killpg(first.pid, signal.SIGKILL)  # a dead owner: its lock goes with it
    first.wait()
    code, err = finish(start([*tiny_overrides, f"run.dir={run}", "train.total_steps=3"]))
    assert code == 0, err[-2000:]


def test_an_unresumable_change_is_refused_before_anything_is_written(shards, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    code, err = finish(start([*tiny_overrides, f"run.dir={run}", "train.total_steps=4", "run.stop_at_step=2"]))
    assert code == 0, err[-2000:]

    def record(run):  # every file of the run, the lock file included
        return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    damaged = shutil.copytree(run, tmp_path / "damaged")
    (damaged / "checkpoints" / "step_000002" / "__0_0.distcp").write_bytes(b"cut short")
    unresumable = ["train.total_steps=4", "model.embed_dim=48", "data.image_size=48"]
    for where in (run, damaged):  # a damaged checkpoint is not moved aside by a start that is refused
        before = record(where)
        code, err = finish(start([*tiny_overrides, f"run.dir={where}", *unresumable]))
        assert code == 2, err[-2000:]
        assert last_line(err) == (
            f"usjepa train: error: {where} has checkpoints of other settings, which a resume cannot change "
            "(data.image_size: 32 -> 48; model.embed_dim: 32 -> 48); restore them, or start a new run.dir"
        )
        assert record(where) == before
    # A change a resume can take is recorded once the resume is accepted; the same shards
    # spelled another way (relative to the working directory, trailing slash) are no change.
    spelled = f"data.shards={os.path.relpath(shards, REPO)}/"
    code, err = finish(start([*tiny_overrides, spelled, f"run.dir={run}", "train.total_steps=4", "log.every_steps=2"]))
    assert code == 0, err[-2000:]
    assert f"resuming {run} from step 2" in err and "changed settings: data.shards" not in err
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
    run = tmp_path / "run"
    args = [*tiny_overrides, f"run.dir={run}", "train.total_steps=4", "checkpoint.every_steps=2"]
    limited = run_with_file_size_limit(args, 100_000, timeout=120)
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


def test_run_dir_records_that_cannot_be_written_are_one_line(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    args = [*tiny_overrides, f"run.dir={run}", "train.total_steps=2"]
    limited = run_with_file_size_limit(args, 2048, timeout=120)  # the resolved config is larger
    assert limited.returncode == 2, limited.stderr[-2000:]
    assert "Traceback" not in limited.stderr
    advice = "check the free disk space and file-size limit (ulimit -f), then rerun: the run resumes from"
    assert last_line(limited.stderr) == (
        f"usjepa train: error: cannot write the resolved config in {run} (File too large); {advice} the start, "
        "which is intact"
    )
    code, err = finish(start(args))
    assert code == 0, err[-2000:]
    starts = run / "launch" / "starts.jsonl"
    starts.unlink()
    starts.mkdir()  # the append of a resumed start then fails, whatever the record's size
    code, err = finish(start([*args[:-1], "train.total_steps=4"]))
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert last_line(err) == (
        f"usjepa train: error: cannot write the launch record in {run} (Is a directory); {advice} step_000002, "
        "which is intact"
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_garbage_teacher_file_is_one_line(tiny_overrides, tmp_path, suffix):
    garbage = tmp_path / f"teacher{suffix}"
    garbage.write_bytes(bytes(range(256)) * 20)
    code, err = finish(start([*tiny_overrides, f"teacher.checkpoint={garbage}", f"run.dir={tmp_path / 'r'}"]))
    assert code == 2, err[-2000:]
    assert last_line(err).startswith(f"usjepa train: error: {garbage}: not a readable checkpoint (")
    assert "Traceback" not in err


def test_tensorboard_events_that_cannot_be_written_are_one_line_and_the_run_resumes(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    args = [*tiny_overrides, f"run.dir={run}", "train.total_steps=120", "checkpoint.every_steps=20"]
    # as `ulimit -f 600`: the event file outgrows it, each checkpoint file does not
    limited = run_with_file_size_limit(args, 600 * 1024, timeout=300)
    assert limited.returncode == 2, limited.stderr[-2000:]
    assert "Traceback" not in limited.stderr
    latest = rundir.latest_checkpoint(run)
    assert latest is not None and rundir.checkpoint_problem(latest) is None
    (events,) = (run / "tb").glob("events.out.tfevents.*")
    assert last_line(limited.stderr) == (
        f"usjepa train: error: cannot write TensorBoard events to {events} (File too large); check the free disk "
        f"space and file-size limit (ulimit -f), then rerun: the run resumes from {latest.name}, which is intact"
    )
    saved = rundir.read_meta(latest)["step"]
    code, err = finish(start(args), timeout=300)
    assert code == 0, err[-2000:]
    assert f"resuming {run} from step {saved}" in err
    steps = logged_steps(run)  # the cut-off file holds whole events, each step once
    assert sorted(steps) == list(range(1, 121)) and set(steps.values()) == {1}


def test_a_run_dir_on_a_read_only_file_system_is_one_line(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    code, err = finish(start([*tiny_overrides, f"run.dir={run}", "train.total_steps=2"]))
    assert code == 0, err[-2000:]
    with read_only(run):
        code, err = finish(start([*tiny_overrides, f"run.dir={run}", "train.total_steps=4"]))
    assert code == 2, err[-2000:]
    assert err.count("\n") == 1, err
    assert last_line(err) == (
        f"usjepa train: error: run.dir={run}: cannot open its lock file {run / '.lock'} (Read-only file "
        "system); a run writes its checkpoints and logs there: make it writable, or choose another run.dir"
    )


def test_a_hang_up_saves_and_exits_3_and_nohup_still_ignores_it(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    args = [
        *tiny_overrides,
        f"run.dir={run}",
        "train.total_steps=100000",
        "checkpoint.every_steps=1000",
        "data.num_workers=2",
        "data.streams=2",
    ]
    proc = start(args)
    while not logged_steps(run):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGHUP)  # the terminal's whole session: loader workers included
    code, err = finish(proc)
    assert code == 3, err[-2000:]
    saved = rundir.read_meta(rundir.latest_checkpoint(run))["step"]
    assert f"SIGHUP received; saved step {saved} and stopped" in err
    time.sleep(0.5)
    assert not group_alive(proc.pid)

    nohup = subprocess.Popen(  # as `nohup usjepa train ...`: started with SIGHUP ignored
        [sys.executable, "-m", "usjepa", "train", "configs/demo.yaml", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    while max(logged_steps(run), default=0) <= saved:
        assert nohup.poll() is None, nohup.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(nohup.pid, signal.SIGHUP)
    time.sleep(2)
    assert nohup.poll() is None, "a run started under nohup stopped on SIGHUP"
    nohup.send_signal(signal.SIGTERM)
    code, err = finish(nohup)
    assert code == 3 and "SIGTERM received" in err and "SIGHUP" not in err, err[-2000:]


def test_a_run_whose_terminal_hangs_up_still_saves_and_exits_3(tiny_overrides, tmp_path):
    import pty
    import select
    import threading

    run = tmp_path / "run"
    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "usjepa", "train", "configs/demo.yaml", *tiny_overrides, "log.progress=true"]
        + [f"run.dir={run}", "train.total_steps=100000", "checkpoint.every_steps=1000"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,  # the progress bar writes to the terminal all the time
        start_new_session=True,
    )
    os.close(terminal)
    reading = threading.Event()
    reading.set()

    def drain():  # as a terminal shows what is written, until it closes
        while reading.is_set():
            if select.select([master], [], [], 0.1)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    return

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        while not logged_steps(run):
            assert proc.poll() is None, "the run ended early"
            time.sleep(0.05)
    finally:
        reading.clear()
        reader.join()
        os.close(master)  # the terminal is gone: writes to it fail from now on
    os.killpg(proc.pid, signal.SIGHUP)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not end")
    assert code == 3
    assert rundir.latest_checkpoint(run) is not None
