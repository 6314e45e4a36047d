"""A run directory: its resolved config, its checkpoints and the pointers to them, and where
a run's settings say it runs. Everything that reads a run (training, the teacher, probes,
export, bench) finds its parts here; writing a checkpoint is train/checkpoint.py's job.

Layout:
    resolved_config.yaml        the config the run was started with (rewritten on resume)
    checkpoints/step_000120/    DCP files of {"model", "optim"} (+ "target", the EMA encoder)
    checkpoints/step_000120/meta.json   step, samples seen, data position, RNG, teacher
    checkpoints/latest          the name of the newest complete checkpoint
    checkpoints/best            the one with the lowest validation loss (never pruned)
    tb/                         TensorBoard events
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml

from usjepa.config import Config, changed_settings, dump_yaml, load_config, to_dict
from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text

RESOLVED_CONFIG = "resolved_config.yaml"
META = "meta.json"
CHECKPOINT_NAMES = ("best", "latest", "step_N")
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_STEP_NAME = re.compile(r"^step_(\d+)$")
# Settings that may change between invocations of one run without changing its result.
RESUMABLE_CHANGES = (
    "run.stop_at_step",
    "run.threads",
    "run.device",
    "train.total_steps",
    "checkpoint.",
    "log.",
    "data.num_workers",
    "data.micro_batch_size",
    "probe.",
    "distributed.",
    "train.activation_checkpointing",
    "train.compile",
)


def prepare_run_dir(cfg: Config, write: bool = True) -> tuple[Path, list[str]]:
    """Create the run dir and (when `write`: rank 0 of a distributed run) write the resolved config.

    Returns the dir and the settings that differ from the config the run was started with
    (other than those in RESUMABLE_CHANGES); the caller decides how loud to be.
    """
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESOLVED_CONFIG
    drift = []
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        drift = [k for k in changed_settings(old, to_dict(cfg)) if not k.startswith(RESUMABLE_CHANGES)]
    if write:
        atomic_write_text(path, dump_yaml(cfg))
    return run_dir, drift


def is_run_dir(path: Path) -> bool:
    return (Path(path) / RESOLVED_CONFIG).is_file()


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The config run `run_dir` was started with, with dotted `overrides` applied."""
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: not a run dir (no {RESOLVED_CONFIG}); pass the run.dir of a `usjepa train` run")
    return load_config(Path(run_dir) / RESOLVED_CONFIG, overrides)


def resolve_device(setting: str) -> torch.device:
    """The device a `run.device`-style setting names: auto (CUDA where visible, else CPU), cpu,
    cuda or cuda:N."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"run.device={setting}: no CUDA device is visible; use run.device=cpu or auto")
    return device


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
        raise UserError(
            f"{pointer} names {path.name}, which is missing or incomplete; "
            f"point it at one of {[p.name for p in list_checkpoints(run_dir)] or 'no checkpoints'} "
            "or remove it to start from scratch"
        )
    return path


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the lowest validation loss so far, if any was validated."""
    pointer = checkpoint_dir(run_dir) / "best"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(run_dir) / pointer.read_text().strip()
    return path if (path / META).is_file() else None


def find_checkpoint(run_dir: Path, name: str) -> Path:
    """The checkpoint of run `run_dir` that `name` (best, latest or step_N) names. `best` falls
    back to the latest, with a note, where no checkpoint was validated."""
    run_dir = Path(run_dir)
    existing = list_checkpoints(run_dir)
    if not existing:
        raise UserError(
            f"{run_dir}: no checkpoint yet; train it first (usjepa train CONFIG run.dir={run_dir}) "
            "or wait for its first checkpoint (every checkpoint.every_steps steps)"
        )
    if name == "best" and (best := best_checkpoint(run_dir)) is not None:
        return best
    if name in ("best", "latest"):
        latest = latest_checkpoint(run_dir) or existing[-1]
        if name == "best":
            print(
                f"usjepa: {run_dir}: no checkpoint was validated (no val split, or train.validate=false); "
                f"using the latest, {latest.name}",
                file=sys.stderr,
            )
        return latest
    match = _STEP_NAME.match(name)
    for path in existing:
        if match and int(path.name.removeprefix("step_")) == int(match.group(1)):
            return path
    raise UserError(
        f"{run_dir}: no checkpoint '{name}'; choose latest, best or one of {', '.join(p.name for p in existing)}"
    )


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every call without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_module_weights(path: Path, module: torch.nn.Module, prefix: str, key: str = "model") -> None:
    """Load the parameters checkpoint `path` saved under `<key>.<prefix>` into `module`: the
    student's encoder (`model.encoder.`), or the EMA target (`target.`, prefix ""). One process
    reads a checkpoint that any number of ranks wrote."""
    wanted = {f"{prefix}{k}": v for k, v in module.state_dict().items()}
    with single_process_quiet():
        dcp.load({key: wanted}, checkpoint_id=path, no_dist=True)
    module.load_state_dict({k[len(prefix) :]: v for k, v in wanted.items()})
