"""The local Slurm cluster of launch/dev_cluster.sh, for tests: bring-up fixture support and
subprocess helpers that can never hang a test."""

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


def env() -> dict[str, str]:
    # The cluster's own config, whoever owns /etc/slurm/slurm.conf.
    return {**os.environ, "SLURM_CONF": str(CLUSTER_DIR / "etc" / "slurm.conf")}


def run(cmd: list[str], timeout: float = JOB_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    # Own process group, killed whole on timeout: a grandchild holding the output pipes
    # would otherwise keep subprocess.run waiting past its timeout.
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True
    ) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
            raise AssertionError(
                f"{' '.join(cmd)} still running after {timeout} s\nstdout:\n{stdout}\nstderr:\n{stderr}"
            ) from None
    proc = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def cluster_session():
    """Generator behind the `slurm_cluster` fixture (conftest.py)."""
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
