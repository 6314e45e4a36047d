"""`launch/submit.py` on the real local Slurm cluster (two nodes, launch/dev_cluster.sh).

Each test submits the tiny SALT model as a user would, on 2 nodes x 1 task, and checks what
the user sees: the job's end, the TensorBoard losses against an uninterrupted run, the run
dir's records. Every wait has a timeout; nothing can hang.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_util import run, wait_for
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from usjepa import rundir
from usjepa.train.provenance import read_records

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 30
COMMON = [f"train.total_steps={STEPS}", "checkpoint.every_steps=10", "data.streams=2", "data.num_workers=0"]
SUBMIT_TIMEOUT_S = 300


def submit(*args: str, timeout: float = SUBMIT_TIMEOUT_S) -> subprocess.CompletedProcess:
    return run(
        [sys.executable, str(REPO / "launch" / "submit.py"), "configs/demo.yaml", *args], timeout=timeout, check=False
    )


def job_id_of(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split("submitted job ")[1].split(";")[0]


def losses(run_dir: Path) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def latest_step(run_dir: Path) -> int:
    path = rundir.latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    return rundir.read_meta(path)["step"] if path else 0


def logged_steps(run_dir: Path) -> int:
    if not (run_dir / "tb").is_dir():
        return 0
    try:
        return max(losses(run_dir), default=0)
    except KeyError:  # no train/loss yet
        return 0


def job_state(job_id: str) -> str:
    out = run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False).stdout.strip()
    return out or run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], check=False).stdout.strip()


@pytest.fixture(scope="module")
def reference(tiny_overrides, tmp_path_factory) -> dict[int, float]:
    """The losses of an uninterrupted run, in one local process (the data and the losses do
    not depend on the world size)."""
    run_dir = tmp_path_factory.mktemp("slurm_reference") / "run"
    out = subprocess.run(
        [sys.executable, "-m", "usjepa", "train", "configs/demo.yaml", *tiny_overrides, *COMMON, f"run.dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return losses(run_dir)


def assert_same_losses(reference: dict[int, float], run_dir: Path) -> None:
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))  # no repeated or missing steps
    assert all(got[s] == pytest.approx(reference[s], rel=1e-5, abs=1e-7) for s in got)


def test_dry_run_validates_and_submits_nothing(slurm_cluster, tiny_overrides, tmp_path):
    out = submit(*tiny_overrides, *COMMON, f"run.dir={tmp_path / 'run'}", "--nodes", "2", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "nodes: 2" in out.stdout and "signal_delay_s: 90" in out.stdout and "streams: 2" in out.stdout
    assert not (tmp_path / "run").exists()
    bad = submit(*tiny_overrides, "data.streams=1", f"run.dir={tmp_path / 'run'}", "--nodes", "2")
    assert bad.returncode == 2 and "data.streams=1 cannot be split over 2 ranks" in bad.stderr
    missing = submit(*tiny_overrides, *COMMON, "data.shards=/nonexistent/shards", f"run.dir={tmp_path / 'run'}")
    assert missing.returncode == 2 and "/nonexistent/shards" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_a_two_node_run_completes_and_records_how_it_ran(slurm_cluster, reference, tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    out = submit(*tiny_overrides, *COMMON, f"run.dir={run_dir}", "--nodes", "2", "--time", "10", "--wait")
    job_id = job_id_of(out)
    assert f"job {job_id} finished" in out.stdout
    assert_same_losses(reference, run_dir)
    [submission] = read_records(run_dir, "submissions.jsonl")
    assert submission["job_id"] == job_id and "launch/submit.py" in " ".join(submission["command"])
    assert len(submission["code"]["git_rev"]) == 40
    [start] = read_records(run_dir, "starts.jsonl")
    assert start["slurm_job_id"] == job_id and start["world_size"] == 2 and start["launcher"] == "slurm"
    assert (run_dir / "resolved_config.yaml").is_file()


def _interrupt_then_finish(reference, run_dir: Path, job_id: str, interrupt) -> None:
    wait_for(lambda: logged_steps(run_dir) >= 5, 180, "5 logged steps")
    interrupt()
    wait_for(
        lambda: job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
        300,
        f"job {job_id} to end (state {job_state(job_id)})",
    )
    assert job_state(job_id) == "COMPLETED"
    starts = read_records(run_dir, "starts.jsonl")
    assert len(starts) >= 2 and {s["slurm_job_id"] for s in starts} == {job_id}  # requeued: same job id
    assert int(starts[-1]["slurm_restart_count"]) >= 1
    assert 0 < starts[1]["step"] < STEPS  # resumed mid-run
    assert_same_losses(reference, run_dir)


def test_usr2_saves_then_requeues_and_the_run_ends_as_if_uninterrupted(
    slurm_cluster, reference, tiny_overrides, tmp_path
):
    run_dir = tmp_path / "run"
    job_id = job_id_of(submit(*tiny_overrides, *COMMON, f"run.dir={run_dir}", "--nodes", "2", "--time", "10"))
    # What Slurm sends at the time limit minus --signal-delay (and on preemption).
    _interrupt_then_finish(reference, run_dir, job_id, lambda: run(["scancel", "--signal=USR2", job_id]))
    log = (run_dir / "slurm" / f"{job_id}_0_log.err").read_text()
    assert "SIGUSR2 received; saved step" in log


def test_preemption_by_a_high_priority_job_requeues_and_finishes(slurm_cluster, reference, tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    job_id = job_id_of(
        submit(*tiny_overrides, *COMMON, f"run.dir={run_dir}", "--nodes", "2", "--time", "10", "--partition", "debug")
    )

    def preempt():
        # All CPUs of both nodes in the high partition: the training job must make room.
        cpus = run(["sinfo", "-h", "-N", "-o", "%c"]).stdout.split()[0]
        run(
            [
                "sbatch",
                "--parsable",
                "-p",
                "high",
                "-N2",
                f"--ntasks-per-node={cpus}",
                "-t",
                "1",
                f"--output={tmp_path / 'high-%j.out'}",
                "--wrap",
                "sleep 3",
            ]
        )

    _interrupt_then_finish(reference, run_dir, job_id, preempt)


def test_a_requeue_from_outside_resumes_from_the_latest_checkpoint(slurm_cluster, reference, tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    job_id = job_id_of(submit(*tiny_overrides, *COMMON, f"run.dir={run_dir}", "--nodes", "2", "--time", "10"))
    _interrupt_then_finish(reference, run_dir, job_id, lambda: run(["scontrol", "requeue", job_id]))


def test_a_failing_job_reports_its_error_to_the_submitter(slurm_cluster, tiny_overrides, tmp_path):
    t0 = time.monotonic()
    out = submit(
        *tiny_overrides,
        *COMMON,
        "data.shards=/nowhere/shards",
        f"run.dir={tmp_path / 'run'}",
        "--nodes",
        "2",
        "--no-data-check",
        "--wait",
    )
    assert out.returncode == 1, out.stdout + out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("job ") and " failed: " in error and "/nowhere/shards" in error, error
    assert time.monotonic() - t0 < SUBMIT_TIMEOUT_S


def test_the_srun_template_without_submitit_requeues_itself(slurm_cluster, reference, tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    job_id = (
        run(
            [
                "sbatch",
                "--parsable",
                "--nodes=2",
                "--ntasks-per-node=1",
                "-t",
                "10",
                f"--export=ALL,PYTHON={sys.executable}",
                f"--output={tmp_path / 'slurm-%j.out'}",
                "launch/multinode.sbatch",
                "configs/demo.yaml",
                *tiny_overrides,
                *COMMON,
                f"run.dir={run_dir}",
            ]
        )
        .stdout.strip()
        .split(";")[0]
    )
    # USR2 to the tasks (what --signal=USR2@90 does): they save, exit 75, the script requeues.
    _interrupt_then_finish(reference, run_dir, job_id, lambda: run(["scancel", "--signal=USR2", job_id]))
