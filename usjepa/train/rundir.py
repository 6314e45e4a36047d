"""The run directory: where a run's config, checkpoints and TensorBoard events live."""

from __future__ import annotations

from pathlib import Path

import yaml

from usjepa.config import Config, changed_settings, dump_yaml, to_dict
from usjepa.fileio import atomic_write_text

RESOLVED_CONFIG = "resolved_config.yaml"
# Settings that may change between invocations of one run without changing its result.
RESUMABLE_CHANGES = ("run.stop_at_step", "run.threads", "run.device", "train.total_steps",
                     "checkpoint.", "log.", "data.num_workers", "data.micro_batch_size", "probe.",
                     "distributed.", "train.activation_checkpointing", "train.compile")


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
