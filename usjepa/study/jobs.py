"""The study as jobs (one `usjepa train` or `usjepa probe` process each) and a small scheduler
that runs them, a few at a time, in the order their dependencies allow.

Every job knows from the files it leaves whether it is done, so an interrupted study rerun
with the same `out` redoes nothing finished: a training run resumes from its last checkpoint,
a probe whose report exists is skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text


@dataclass
class Job:
    key: str  # e.g. train/salt/seed0, probe/salt/seed0/blines
    args: list[str]  # `usjepa` arguments
    done: Callable[[], bool]
    after: list[str] = field(default_factory=list)  # keys of jobs that must finish first


def _log_time(out: Path, key: str, seconds: float) -> None:
    with open(out / "jobs.jsonl", "a") as f:
        f.write(json.dumps({"job": key, "seconds": round(seconds, 2), "time": time.time()}) + "\n")


def job_seconds(out: Path) -> dict[str, float]:
    """Wall seconds each job took, summed over the invocations of the study (a resumed job
    counts each of its parts)."""
    seconds: dict[str, float] = {}
    path = Path(out) / "jobs.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else ():
        entry = json.loads(line)
        seconds[entry["job"]] = seconds.get(entry["job"], 0.0) + entry["seconds"]
    return seconds


def _start(job: Job, logs: Path) -> subprocess.Popen:
    log = logs / (job.key.replace("/", "_") + ".log")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "usjepa", *job.args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return lines[-1] if lines else "(no output)"


def run_jobs(jobs: list[Job], out: Path, slots: int, progress: bool = True) -> None:
    """Run the jobs not done yet, at most `slots` at a time; the first failure stops the
    study (running jobs finish, nothing new starts) with its log's last line. Ctrl-C or
    SIGTERM stops the running jobs (training runs save first) so a rerun resumes them."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    by_key = {j.key: j for j in jobs}
    finished = {j.key for j in jobs if j.done()}
    waiting = [j for j in jobs if j.key not in finished]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: list[str] = []
    bar = tqdm(
        total=len(jobs), initial=len(finished), desc="study", unit="job", disable=not progress, dynamic_ncols=True
    )
    try:
        while waiting or running:
            for job in [j for j in waiting if not failed and all(d in finished for d in j.after)][
                : slots - len(running)
            ]:
                waiting.remove(job)
                running[job.key] = (_start(job, logs), time.perf_counter())
                bar.set_postfix_str(", ".join(running))
            if failed and not running:
                break
            time.sleep(0.2)
            for key, (proc, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[key]
                _log_time(out, key, time.perf_counter() - start)
                if proc.returncode == 0 and by_key[key].done():
                    finished.add(key)
                    bar.update(1)
                else:
                    failed.append(key)
    except BaseException:
        for proc, _ in running.values():  # the runs save on SIGTERM; a rerun continues them
            os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in running.values():
            proc.wait()
        raise
    finally:
        bar.close()
    if failed:
        log = logs / (failed[0].replace("/", "_") + ".log")
        raise UserError(
            f"study job {failed[0]} failed: {_last_line(log)} (log: {log}); fix it and rerun the "
            "same command: finished jobs are kept"
        )


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")
