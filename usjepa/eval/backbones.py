"""Frozen encoders to probe: a run's student, its teacher, a random-init encoder, or an
encoder written by `usjepa export` (given as its folder)."""

from __future__ import annotations

from pathlib import Path

from collections.abc import Sequence

import torch

from usjepa.config import Config, load_config
from usjepa.errors import UserError
from usjepa.export import is_export, load_export
from usjepa.models.teacher import load_teacher
from usjepa.models.vit import Encoder, build_encoder
from usjepa.train import checkpoint as ckpt
from usjepa.train.rundir import RESOLVED_CONFIG

BACKBONES = ("student", "teacher", "random")
CHECKPOINTS = ("latest", "best")


def is_backbone(spec: str) -> bool:
    return spec in BACKBONES or is_export(Path(spec))


def backbone_name(spec: str) -> str:
    """What reports and tables call backbone `spec`: an export by its folder's name."""
    return spec if spec in BACKBONES else Path(spec).resolve().name


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir}: no {RESOLVED_CONFIG}; pass the run.dir of a `usjepa train` run")
    return load_config(path, overrides)


def load_backbone(kind: str, run_dir: Path, device: torch.device, overrides: Sequence[str] = (),
                  checkpoint: str = "latest") -> tuple[Encoder, Config]:
    """The encoder `kind` of run `run_dir` (frozen, eval mode) and that run's config.

    - student: the run's encoder at its `latest` checkpoint or at its `best` (lowest validation
      loss); a stage-1 run's encoder is its teacher;
    - teacher: the frozen teacher a SALT run trained against;
    - random: the run's encoder architecture with seeded random weights;
    - an export folder: its weights; the run only supplies the probe settings and data.
    """
    cfg = run_config(run_dir, overrides)
    if kind == "student":
        if checkpoint not in CHECKPOINTS:
            raise UserError(f"unknown checkpoint '{checkpoint}'; choose one of {', '.join(CHECKPOINTS)}")
        find = ckpt.latest_checkpoint if checkpoint == "latest" else ckpt.best_checkpoint
        path = find(Path(run_dir))
        if path is None:
            raise UserError(f"{run_dir}: no {checkpoint} checkpoint yet; train the run first"
                            + (" with train.validate=true and a val split" if checkpoint == "best" else ""))
        encoder = build_encoder(cfg.model, cfg.data.image_size)
        ckpt.load_module_weights(path, encoder, prefix="encoder.")
    elif kind == "teacher":
        if cfg.train.objective != "salt":
            raise UserError(f"{run_dir} is a stage-1 ({cfg.train.objective}) run: its encoder is the "
                            "teacher; probe it with --backbone student")
        encoder, _ = load_teacher(cfg, device)
    elif kind == "random":
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            encoder = build_encoder(cfg.model, cfg.data.image_size)
    elif is_export(Path(kind)):
        encoder, config = load_export(kind)
        if config["model_args"]["img_size"] != cfg.data.image_size:
            raise UserError(f"export {kind} takes {config['model_args']['img_size']} px images but run {run_dir} "
                            f"probes at data.image_size={cfg.data.image_size}; probe it with a run of the same size")
    else:
        raise UserError(f"unknown backbone '{kind}'; choose one of {', '.join(BACKBONES)} or an export folder")
    return encoder.to(device).eval().requires_grad_(False), cfg
