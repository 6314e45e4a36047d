"""The local two-node Slurm cluster of launch/dev_cluster.sh: jobs span both nodes, finished
jobs reach accounting, and signals reach job processes (what requeue-on-USR2 relies on).

The session fixture brings the cluster up (installing Debian packages on first use) and takes
it down again only if it started it, so a developer's running cluster survives the tests.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "dev_cluster.sh"
CLUSTER_DIR = Path(os.environ.get("USJEPA_CLUSTER_DIR", "/tmp/usjepa-slurm"))
# Package installation is the slow part of a first `up` (the script bounds apt itself).
UP_TIMEOUT_S = 900
JOB_TIMEOUT_S = 60


def _cannot_run_cluster() -> str | None:
    if os.geteuid() != 0:
        return "launch/dev_cluster.sh needs root"
    if not shutil.which("apt-get") and not (shutil.which("slurmctld") and shutil.which("slurmd")):
        return "no apt-get to install Slurm and no Slurm binaries on this machine"
    return None


def _env() -> dict[str, str]:
    # The cluster's own config, whoever owns /etc/slurm/slurm.conf.
    return {**os.environ, "SLURM_CONF": str(CLUSTER_DIR / "etc" / "slurm.conf")}


def run(cmd: list[str], timeout: float = JOB_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    # Own process group, killed whole on timeout: a grandchild holding the output pipes
    # would otherwise keep subprocess.run waiting past its timeout.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                          start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
            raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s\nstdout:\n{stdout}\n"
                                 f"stderr:\n{stderr}") from None
    proc = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _cannot_run_cluster()
    if reason:
        pytest.skip(reason)
    was_up = run([str(SCRIPT), "status"], timeout=60, check=False).returncode == 0
    up = run([str(SCRIPT), "up"], timeout=UP_TIMEOUT_S, check=False)
    if up.returncode != 0:
        pytest.fail(f"launch/dev_cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}", pytrace=False)
    yield CLUSTER_DIR
    if not was_up:
        run([str(SCRIPT), "down"], timeout=120, check=False)


def _job_state(job_id: str) -> str:
    out = run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], check=False).stdout.strip()
    return out.splitlines()[0] if out else ""


@pytest.mark.slow
def test_srun_spans_both_nodes(slurm_cluster):
    out = run(["srun", "-N2", "--ntasks-per-node=1", "-t", "1", "bash", "-c",
               "echo $SLURM_NODEID $SLURMD_NODENAME"]).stdout
    assert sorted(out.splitlines()) == ["0 n1", "1 n2"]


@pytest.mark.slow
def test_sbatch_wait_is_completed_in_sacct(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job_id = run(["sbatch", "--parsable", "--wait", "-t", "1", "-o", str(out),
                  "--wrap", "echo ok on $SLURMD_NODENAME"]).stdout.strip().split(";")[0]
    assert out.read_text().startswith("ok on n")
    # slurmctld forwards the job end to slurmdbd asynchronously.
    wait_for(lambda: _job_state(job_id) == "COMPLETED", 30, f"job {job_id} COMPLETED in sacct "
             f"(last: {_job_state(job_id)!r})")


TRAP_SCRIPT = """#!/bin/bash
trap 'echo "USR2 in job $SLURM_JOB_ID" > {got}; exit 0' USR2
touch {ready}
# Short sleeps: bash runs the trap only between foreground commands.
for i in $(seq 300); do sleep 0.2; done
"""


# Without --batch, Slurm signals the job's steps but not the batch shell: a submitit job
# (sbatch script that runs `srun python ...`) gets USR2 in its srun step, a plain batch
# script only with --batch.
@pytest.mark.slow
@pytest.mark.parametrize("in_step", [False, True], ids=["batch-shell", "srun-step"])
def test_scancel_usr2_reaches_job_process(slurm_cluster, tmp_path, in_step):
    got, ready = tmp_path / "got_usr2", tmp_path / "ready"
    script = tmp_path / "trap.sh"
    script.write_text(TRAP_SCRIPT.format(got=got, ready=ready))
    script.chmod(0o755)
    # The trap script itself is the batch shell: --batch signals that shell, not its children.
    job = ["--wrap", f"srun {script}"] if in_step else [str(script)]
    job_id = run(["sbatch", "--parsable", "-t", "2", "-o", str(tmp_path / "job.out"),
                  *job]).stdout.strip().split(";")[0]
    try:
        wait_for(ready.exists, JOB_TIMEOUT_S, f"job {job_id} to start")
        run(["scancel", "--signal=USR2", *([] if in_step else ["--batch"]), job_id])
        text = wait_for(lambda: got.exists() and got.read_text(), 20, "the USR2 trap to run")
        assert text.strip() == f"USR2 in job {job_id}"
        wait_for(lambda: _job_state(job_id) == "COMPLETED", 30, f"job {job_id} to end after its trap")
    finally:
        run(["scancel", job_id], check=False)
