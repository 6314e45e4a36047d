"""The local two-node Slurm cluster of launch/dev_cluster.sh: jobs span both nodes, finished
jobs reach accounting, and signals reach job processes (what requeue-on-USR2 relies on).

The session fixture brings the cluster up (installing Debian packages on first use) and takes
it down again only if it started it, so a developer's running cluster survives the tests.
"""

import pytest
from slurm_util import JOB_TIMEOUT_S, run, wait_for


def _job_state(job_id: str) -> str:
    out = run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], check=False).stdout.strip()
    return out.splitlines()[0] if out else ""


@pytest.mark.slow
def test_srun_spans_both_nodes(slurm_cluster):
    out = run(
        ["srun", "-N2", "--ntasks-per-node=1", "-t", "1", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME"]
    ).stdout
    assert sorted(out.splitlines()) == ["0 n1", "1 n2"]


@pytest.mark.slow
def test_sbatch_wait_is_completed_in_sacct(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job_id = (
        run(["sbatch", "--parsable", "--wait", "-t", "1", "-o", str(out), "--wrap", "echo ok on $SLURMD_NODENAME"])
        .stdout.strip()
        .split(";")[0]
    )
    assert out.read_text().startswith("ok on n")
    # slurmctld forwards the job end to slurmdbd asynchronously.
    wait_for(
        lambda: _job_state(job_id) == "COMPLETED", 30, f"job {job_id} COMPLETED in sacct (last: {_job_state(job_id)!r})"
    )


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
    job_id = (
        run(["sbatch", "--parsable", "-t", "2", "-o", str(tmp_path / "job.out"), *job]).stdout.strip().split(";")[0]
    )
    try:
        wait_for(ready.exists, JOB_TIMEOUT_S, f"job {job_id} to start")
        run(["scancel", "--signal=USR2", *([] if in_step else ["--batch"]), job_id])
        text = wait_for(lambda: got.exists() and got.read_text(), 20, "the USR2 trap to run")
        assert text.strip() == f"USR2 in job {job_id}"
        wait_for(lambda: _job_state(job_id) == "COMPLETED", 30, f"job {job_id} to end after its trap")
    finally:
        run(["scancel", job_id], check=False)
