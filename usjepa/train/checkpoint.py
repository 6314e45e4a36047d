"""Training checkpoints: torch.distributed.checkpoint (DCP) + a small JSON of loop state.

Layout inside a run dir:
    checkpoints/step_000120/   DCP files of {"model", "optim"} and, for the EMA baseline,
                               "target" (the EMA encoder); sharded when distributed
    checkpoints/step_000120/meta.json   step, samples seen, data position, RNG, teacher
    checkpoints/latest         the name of the newest complete checkpoint
    checkpoints/best           the one with the lowest validation loss (never pruned)

A checkpoint is written under a temporary name and renamed when complete, and `latest` is
replaced atomically, so a job killed mid-save leaves the previous checkpoint intact.
The frozen teacher is never saved here, only its path and hash (in meta.json).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text
from usjepa.train.distributed import barrier, in_process_group, is_main

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
META = "meta.json"


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint that `latest` names, or None for a fresh run.

    A `latest` that names a missing checkpoint is an error, not a silent restart from step 0.
    """
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(run_dir) / pointer.read_text().strip()
    if not (path / META).is_file():
        raise UserError(f"{pointer} names {path.name}, which is missing or incomplete; "
                        f"point it at one of {[p.name for p in list_checkpoints(run_dir)] or 'no checkpoints'} "
                        "or remove it to start from scratch")
    return path


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the lowest validation loss so far, if any was validated."""
    pointer = checkpoint_dir(run_dir) / "best"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(run_dir) / pointer.read_text().strip()
    return path if (path / META).is_file() else None


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, target: torch.nn.Module | None) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if target is not None:
        state["target"] = get_model_state_dict(target)
    return state


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], keep_last: int, target: torch.nn.Module | None = None) -> Path:
    """Write checkpoint `step` of model + optimizer (+ the EMA `target`) + meta; prune to the
    newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with _single_process_quiet():
        dcp.save(_state(model, optimizer, target), checkpoint_id=tmp, no_dist=not in_process_group())
    if is_main():
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name)
        best = best_checkpoint(run_dir)
        val_loss = meta.get("val_loss")
        if val_loss is not None and (best is None or val_loss < read_meta(best).get("val_loss", math.inf)):
            atomic_write_text(root / "best", final.name)
            best = final
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    target: torch.nn.Module | None = None) -> dict[str, Any]:
    """Restore model + optimizer (+ the EMA `target`) in place from `path`; return its meta."""
    state = _state(model, optimizer, target)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not in_process_group())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if target is not None:
        set_model_state_dict(target, state["target"])
    return read_meta(path)


def load_module_weights(path: Path, module: torch.nn.Module, prefix: str, key: str = "model") -> None:
    """Load the parameters saved under `<key>.<prefix>` into `module`: the student's encoder
    (`model.encoder.`), or the EMA target (`target.`, prefix "")."""
    wanted = {f"{prefix}{k}": v for k, v in module.state_dict().items()}
    with _single_process_quiet():
        dcp.load({key: wanted}, checkpoint_id=path, no_dist=True)
    module.load_state_dict({k[len(prefix):]: v for k, v in wanted.items()})


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())
