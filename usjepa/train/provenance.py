"""What a run dir records about how it was launched: the code revision (with the diff of a
dirty tree), every submission, and every start (host, world size, Slurm job id, restart).

    RUN/launch/submissions.jsonl   one line per `launch/submit.py` (command, job id, code)
    RUN/launch/starts.jsonl        one line per start of training (resumes and requeues too)
    RUN/launch/code-<rev>-<hash>.diff  uncommitted changes, when the tree was dirty (one file per diff)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import usjepa
from usjepa.fileio import atomic_write_text

LAUNCH_DIR = "launch"
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST", "SLURM_JOB_PARTITION")


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def code_state(run_dir: Path) -> dict:
    """The usjepa code that runs: version, git revision and dirtiness of its checkout; the
    diff of a dirty tree is written beside the records (a rev alone would not rebuild it)."""
    repo = Path(usjepa.__file__).resolve().parent.parent
    state: dict = {"version": usjepa.__version__, "path": str(repo)}
    rev = _git(repo, "rev-parse", "HEAD")
    if rev is None:
        return state  # an installed package, not a checkout
    state["git_rev"] = rev.strip()
    diff = _git(repo, "diff", "HEAD", "--binary") or ""
    untracked = (_git(repo, "ls-files", "--others", "--exclude-standard") or "").split()
    state["dirty"] = bool(diff or untracked)
    if state["dirty"]:
        # Named by content: every start of an unchanged dirty tree refers to one file.
        name = f"code-{state['git_rev'][:12]}-{hashlib.sha256(diff.encode()).hexdigest()[:12]}.diff"
        path = Path(run_dir) / LAUNCH_DIR / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, diff)
        state["diff"] = name
        state["untracked"] = untracked
    return state


def _append(run_dir: Path, name: str, record: dict) -> None:
    path = Path(run_dir) / LAUNCH_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one short line per record: appends do not interleave
        f.write(json.dumps(record) + "\n")


def record_submission(run_dir: Path, job_id: str, parameters: dict) -> None:
    _append(
        run_dir,
        "submissions.jsonl",
        {
            "time": time.time(),
            "command": [sys.executable, *sys.argv],
            "cwd": os.getcwd(),
            "job_id": job_id,
            "parameters": parameters,
            "user": os.environ.get("USER", ""),
            "code": code_state(run_dir),
        },
    )


def record_start(run_dir: Path, step: int, world_size: int, launcher: str) -> None:
    """Called by rank 0 each time training starts or resumes."""
    _append(
        run_dir,
        "starts.jsonl",
        {
            "time": time.time(),
            "host": socket.gethostname(),
            "step": step,
            "world_size": world_size,
            "launcher": launcher,
            "command": [sys.executable, *sys.argv],
            "code": code_state(run_dir),
            **{k.lower(): os.environ[k] for k in SLURM_VARS if k in os.environ},
        },
    )


def read_records(run_dir: Path, name: str) -> list[dict]:
    path = Path(run_dir) / LAUNCH_DIR / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
