"""Training checkpoints: torch.distributed.checkpoint (DCP) of {"model", "optim"} (+ the EMA
"target") and a small JSON of loop state, written by every rank, read back by every rank.

A checkpoint is written under a temporary name and renamed when complete, and `latest` is
replaced atomically, so a job killed mid-save leaves the previous checkpoint intact. Its
meta.json, written last, lists the size and sha256 of every other file, so that a start, a
probe or an export finds a checkpoint damaged afterwards (rundir.checkpoint_problem) and falls
back to an intact one (rundir.resume_checkpoint, rundir.find_checkpoint). The
frozen teacher is never saved here, only its path and hash (in meta.json). Where
checkpoints live and how they are found: usjepa/rundir.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text
from usjepa.rundir import (
    META,
    best_checkpoint,
    cannot_write,
    checkpoint_dir,
    checkpoint_files,
    list_checkpoints,
    read_meta,
    single_process_quiet,
)
from usjepa.train.distributed import barrier, in_process_group, is_main


def rng_state() -> dict[str, str]:
    """Torch RNG states as base64 text (numpy and Python RNGs are never used implicitly here)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def set_rng_state(states: dict[str, str]) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(states["torch"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(states["cuda"]))


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, target: torch.nn.Module | None) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if target is not None:
        state["target"] = get_model_state_dict(target)
    return state


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep_last: int,
    target: torch.nn.Module | None = None,
) -> Path:
    """Write checkpoint `step` of model + optimizer (+ the EMA `target`) + meta; prune to the
    newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    try:
        with single_process_quiet():
            dcp.save(_state(model, optimizer, target), checkpoint_id=tmp, no_dist=not in_process_group())
        barrier()  # every rank's files are complete before rank 0 hashes them
        if is_main():
            # meta.json last, atomically: a step dir whose meta.json parses holds every file it lists.
            meta = {"step": step, **meta, "files": checkpoint_files(tmp)}
            atomic_write_text(tmp / META, json.dumps(meta, indent=1))
    except (OSError, CheckpointException) as e:
        # DCP reports a failed write as the error of its writer (torch's zip writer: a
        # RuntimeError, not the OSError) inside a CheckpointException.
        cause = e if isinstance(e, OSError) else next(iter(e.failures.values()))[0]
        why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).strip().splitlines()[0]
        shutil.rmtree(tmp, ignore_errors=True)
        raise cannot_write(f"checkpoint {final}", why, resume_point(run_dir)) from None
    if is_main():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name)
        best = best_checkpoint(run_dir)
        val_loss = meta.get("val_loss")
        if val_loss is not None and (best is None or val_loss < _val_loss(best)):
            atomic_write_text(root / "best", final.name)
            best = final
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _latest_name(run_dir: Path) -> str:
    """What `latest` names now ("" for none)."""
    pointer = checkpoint_dir(run_dir) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else ""


def resume_point(run_dir: Path) -> str:
    """Where a rerun of `run_dir` starts, for error messages: the checkpoint `latest` names, or
    "the start"."""
    try:
        return _latest_name(run_dir) or "the start"
    except OSError:
        return "its latest checkpoint"


def _val_loss(path: Path) -> float:
    """The val loss in `path`'s meta; inf where it has none or its meta.json is damaged (a new
    checkpoint then replaces it as `best` rather than the save failing)."""
    try:
        return float(read_meta(path).get("val_loss", float("inf")))
    except UserError:
        return float("inf")


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, target: torch.nn.Module | None = None
) -> dict[str, Any]:
    """Restore model + optimizer (+ the EMA `target`) in place from `path`; return its meta."""
    state = _state(model, optimizer, target)
    with single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not in_process_group())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if target is not None:
        set_model_state_dict(target, state["target"])
    return read_meta(path)
