"""The bench's backbones: each spec entry as a frozen encoder (gray input -> tokens), the
input size it takes, and what identifies it (the hash of its weights plus provenance)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from usjepa.bench.features import weights_sha256
from usjepa.bench.loaders import EXTERNAL_KINDS, load_external
from usjepa.bench.spec import BackboneSpec, BenchSpec
from usjepa.data.augment import PIXEL_MEAN, PIXEL_STD
from usjepa.errors import UserError
from usjepa.eval.backbones import load_backbone
from usjepa.models.loading import load_encoder


@dataclass
class Backbone:
    name: str
    module: torch.nn.Module  # eval mode, frozen, on the bench's device
    image_size: int
    weights_sha256: str
    provenance: dict  # JSON-ready: kind, source, source sha256, checkpoint step, preprocessing

    def cache_fields(self) -> dict:
        """What the features depend on besides the data."""
        return {
            "weights": self.weights_sha256,
            "image_size": self.image_size,
            "preprocess": {k: self.provenance.get(k) for k in ("pooling", "mean", "std", "in_chans")},
        }


def _ours(spec: BackboneSpec, device: torch.device) -> tuple[torch.nn.Module, int, dict]:
    """A backbone this project trained: a run's encoder, an export, or a random init like a run."""
    if spec.kind == "export" or (spec.kind == "run" and spec.encoder in ("student", "target")):
        loaded = load_encoder(spec.path, which=spec.encoder, checkpoint=spec.checkpoint)
        info = {"source": str(loaded.path.resolve()), "source_sha256": loaded.sha256, "step": loaded.step}
        if loaded.kind == "run":
            info.update(encoder=spec.encoder, checkpoint=loaded.checkpoint)
        else:
            info["run"] = loaded.export_config.get("usjepa", {}).get("run")
        size = loaded.encoder.patch_embed.img_size[0]
        return loaded.encoder.to(device).eval().requires_grad_(False), size, info
    run_dir = Path(spec.like or spec.path)
    which = "random" if spec.kind == "random" else spec.encoder
    overrides = [f"run.seed={spec.seed}"] if spec.kind == "random" else []
    module, cfg = load_backbone(which, run_dir, device, overrides)
    info = {"source": str(run_dir.resolve()), "encoder": which}
    if which == "teacher":
        info["teacher"] = cfg.teacher.checkpoint
    else:
        info["seed"] = spec.seed
    return module.float(), cfg.data.image_size, info


def load_bench_backbone(name: str, spec: BackboneSpec, bench: BenchSpec, device: torch.device) -> Backbone:
    """Backbone `name` of the bench, loaded on `device` in fp32."""
    if spec.path and not Path(spec.path).exists():
        raise UserError(f"backbones.{name}.path={spec.path}: no such file or folder")
    if spec.kind in EXTERNAL_KINDS or (spec.kind == "random" and spec.model):
        kind = "timm" if spec.kind == "random" else spec.kind
        loaded = load_external(
            kind,
            spec.path or None,
            spec.model,
            bench.image_size,
            mean=spec.mean,
            std=spec.std,
            pooling=spec.pooling,
            seed=spec.seed,
        )
        module, size = loaded.module.to(device).float(), bench.image_size
        info = {
            **loaded.info,
            "source": str(Path(spec.path).resolve()) if spec.path else None,
            "source_sha256": loaded.sha256 or None,
        }
    else:
        module, size, info = _ours(spec, device)
        info.update(pooling="mean", in_chans=1, mean=[PIXEL_MEAN], std=[PIXEL_STD])
    info = {"kind": spec.kind, **info, "image_size": size}
    return Backbone(name, module, size, weights_sha256(module), json.loads(json.dumps(info, default=str)))
