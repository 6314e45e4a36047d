"""The training job that submitit runs on Slurm (one task per GPU), and how it is stopped.

A job trains from its run dir's latest checkpoint, so every start (the first, a requeue, a
restart after a crash, an `scontrol requeue` from outside) is the same call. On the
time-limit / preemption warning (SIGUSR2, `--signal=USR2@delay`) or a SIGTERM, the trainer
finishes its step and every rank saves its shard of the checkpoint; only then is the signal
handed on to submitit's own handler, which on rank 0 calls `checkpoint()` and requeues the
job with `scontrol requeue` (a limited number of times for time limits, always for
preemption), and the other ranks wait for Slurm to stop them. submitit calls its handler on
rank 0 only and straight away, which would requeue before the other ranks have saved: that is
why the trainer takes the signals while it trains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import submitit

from usjepa.config import config_from_dict
from usjepa.train.loop import train

# How long a rank other than 0 waits, after saving, for the requeue to stop it.
REQUEUE_WAIT_S = 120


@dataclass
class TrainJob:
    """`usjepa train` as a submitit callable. The resolved config is frozen at submission, so
    a requeued job trains with the settings it was submitted with."""

    config: dict  # usjepa.config.to_dict of the resolved Config

    def __call__(self) -> dict:
        result = train(config_from_dict(self.config))
        if result.stop_signal is None:
            return {"run_dir": str(result.run_dir), "step": result.step, "loss": result.loss}
        # Every rank has saved this step. submitit's handler, back in place now, requeues (rank
        # 0), or ignores the signal (SIGTERM: Slurm itself requeues a preempted job or ends it).
        signal.raise_signal(result.stop_signal)
        if result.rank != 0:
            time.sleep(REQUEUE_WAIT_S)
        # No result: the run is not finished, and a requeued job must not look done.
        sys.exit(f"usjepa: stopped by {signal.Signals(result.stop_signal).name} at step {result.step}")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """submitit's requeue hook: the same job again; it resumes from the run dir."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.config))


def requeue_this_job(max_requeues: int) -> str:
    """`scontrol requeue` the Slurm job this process runs in (for batch scripts without
    submitit), unless it was requeued `max_requeues` times; returns what happened."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not in a Slurm job: nothing to requeue"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        return f"job {job} not requeued: it has been requeued {restarts} times (the limit)"
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if done.returncode:
        return f"job {job} not requeued: scontrol: {done.stderr.strip()}"
    return f"requeued job {job} (restart {restarts + 1} of at most {max_requeues})"
