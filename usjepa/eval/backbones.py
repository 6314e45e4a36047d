"""Frozen encoders to probe: a run's student, its teacher, a random-init encoder, an encoder
written by `usjepa export` (given as its folder), or a non-learned baseline (baselines.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from usjepa.config import Config
from usjepa.errors import UserError
from usjepa.eval.baselines import BASELINES, build_baseline
from usjepa.models.loading import is_export, load_encoder
from usjepa.models.teacher import load_teacher
from usjepa.models.vit import build_encoder
from usjepa.rundir import run_config

BACKBONES = ("student", "teacher", "target", "random", *BASELINES)
CHECKPOINTS = ("best", "latest")


def is_backbone(spec: str) -> bool:
    return spec in BACKBONES or is_export(Path(spec))


def backbone_name(spec: str) -> str:
    """What reports and tables call backbone `spec`: an export by its folder's name."""
    return spec if spec in BACKBONES else Path(spec).resolve().name


def load_backbone(
    kind: str, run_dir: Path, device: torch.device, overrides: Sequence[str] = (), checkpoint: str = "best"
) -> tuple[torch.nn.Module, Config]:
    """The encoder `kind` of run `run_dir` (frozen, eval mode) and that run's config.

    - student: the run's encoder at its `best` checkpoint (lowest validation loss, docs/method.md#model-selection;
      `latest` where no checkpoint was validated) or at its `latest`; a stage-1 run's
      encoder is its teacher;
    - teacher: the frozen teacher a SALT run trained against;
    - target: the EMA target encoder of an EMA (I-JEPA) run, at the same checkpoint as `student`
      (I-JEPA evaluates this one);
    - random: the run's encoder architecture with seeded random weights;
    - pixels, histogram: the non-learned baselines of baselines.py; the run only supplies
      data.image_size and the probe settings;
    - an export folder: its weights; the run only supplies the probe settings and data.
    """
    cfg = run_config(run_dir, overrides)
    objective = cfg.train.objective
    if kind in ("student", "target"):
        if checkpoint not in CHECKPOINTS:
            raise UserError(f"unknown checkpoint '{checkpoint}'; choose one of {', '.join(CHECKPOINTS)}")
        if kind == "target" and objective != "ema":
            raise UserError(
                f"{run_dir} is a {objective} run: only an EMA run (train.objective=ema) has a "
                "target encoder; probe --backbone student" + (" or teacher" if objective == "salt" else "")
            )
        encoder = load_encoder(run_dir, which=kind, checkpoint=checkpoint).encoder
    elif kind == "teacher":
        if objective != "salt":
            hint = (
                "its encoder is the teacher; probe it with --backbone student"
                if objective == "mae"
                else "its targets come from the EMA of its own encoder; probe it with --backbone target"
            )
            raise UserError(f"{run_dir} is a {objective} run without a frozen teacher: {hint}")
        encoder, _ = load_teacher(cfg, device)
    elif kind == "random":
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            encoder = build_encoder(cfg.model, cfg.data.image_size)
    elif kind in BASELINES:
        encoder = build_baseline(kind, cfg)
    elif is_export(Path(kind)):
        encoder = load_encoder(kind, image_size=cfg.data.image_size).encoder
    else:
        raise UserError(f"unknown backbone '{kind}'; choose one of {', '.join(BACKBONES)} or an export folder")
    return encoder.to(device).eval().requires_grad_(False), cfg
