"""`usjepa export RUN_DIR OUT`: a run's encoder as timm weights anyone can load.

OUT holds two files:
    encoder.safetensors  the encoder's state dict (fp32, timm parameter names)
    config.json          timm's hub layout (architecture, model_args, pretrained_cfg with the
                         input size and normalisation) plus a `usjepa` section: step, run,
                         checkpoint, teacher fingerprint, version

so `timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])` +
`load_state_dict` rebuilds it (recent timm also takes `create_model("local-dir:OUT",
pretrained=True)`), `usjepa probe RUN --backbone OUT` probes it and
`teacher.checkpoint=OUT/encoder.safetensors` trains a student against it.
The checkpoint is read with DCP into a plain module, so a run saved sharded by several
ranks exports on one CPU process.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save

from usjepa import __version__, rundir
from usjepa.config import ModelConfig
from usjepa.data.augment import PIXEL_MEAN, PIXEL_STD
from usjepa.errors import UserError
from usjepa.fileio import atomic_write, atomic_write_text, make_folder
from usjepa.models.loading import EXPORT_CONFIG as CONFIG
from usjepa.models.loading import EXPORT_WEIGHTS as WEIGHTS
from usjepa.models.loading import load_encoder

# Any timm ViT entry point rebuilds the encoder: model_args set every architecture field.
ARCHITECTURE = "vit_base_patch16_224"


def timm_config(model: ModelConfig, image_size: int) -> dict[str, Any]:
    """timm's hub config.json fields for encoder `model`: enough to rebuild it and feed it."""
    model_args = dict(
        img_size=image_size,
        patch_size=model.patch_size,
        in_chans=1,
        embed_dim=model.embed_dim,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=model.mlp_ratio,
        class_token=False,
        global_pool="",
        num_classes=0,
    )
    # What the probe's eval path does: grayscale [0, 1], shorter side resized, centre square,
    # then (x - mean) / std (usjepa.data.augment.to_model_input).
    pretrained_cfg = dict(
        input_size=[1, image_size, image_size],
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
        mean=[PIXEL_MEAN],
        std=[PIXEL_STD],
        num_classes=0,
        fixed_input_size=True,
    )
    return dict(
        architecture=ARCHITECTURE,
        num_classes=0,
        num_features=model.embed_dim,
        global_pool="",
        model_args=model_args,
        pretrained_cfg=pretrained_cfg,
    )


def _is_ours(name: str) -> bool:
    """An entry a previous (possibly interrupted) export left in OUT."""
    return name in (WEIGHTS, CONFIG) or (name.startswith(".") and name.endswith(".tmp"))


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; pass a folder for the export")
    foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name)) if out.is_dir() else []
    if foreign and not force:
        raise UserError(
            f"{out} holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
            "and is not an earlier export; choose an empty folder or pass --force"
        )


def export_encoder(
    run_dir: str | os.PathLike, out: str | os.PathLike, checkpoint: str = "latest", force: bool = False
) -> Path:
    """Write checkpoint `checkpoint` (latest, best or step_N) of `run_dir`'s encoder to `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if not rundir.is_run_dir(run_dir):
        raise UserError(
            f"{run_dir}: not a run dir (no {rundir.RESOLVED_CONFIG}); pass the run.dir of a `usjepa train` run"
        )
    _check_out(out, force)
    loaded = load_encoder(run_dir, checkpoint=checkpoint)
    cfg, meta = loaded.config, rundir.read_meta(rundir.checkpoint_dir(run_dir) / loaded.checkpoint)
    # The file promises fp32 whatever the module is built in; safetensors needs contiguous tensors.
    weights = {k: v.float().contiguous() for k, v in loaded.encoder.state_dict().items()}
    description = timm_config(cfg.model, cfg.data.image_size)
    source = dict(
        version=__version__,
        run_dir=str(run_dir.resolve()),
        checkpoint=loaded.checkpoint,
        step=meta["step"],
        objective=cfg.train.objective,
        teacher=meta.get("teacher"),
        weights=WEIGHTS,
        features="forward_features(x) -> [B, N, D] final-normed patch tokens, no class token; "
        "the probe mean-pools them",
    )
    metadata = {
        "format": "pt",
        "step": str(meta["step"]),
        "run_dir": source["run_dir"],
        "checkpoint": loaded.checkpoint,
        "usjepa_version": __version__,
        "model_args": json.dumps(description["model_args"]),
    }
    blob = save(weights, metadata=metadata)
    make_folder(out, "the export folder", "choose a folder you can write to for OUT")
    try:
        # config.json marks a complete export: drop the old one first so that an interrupted
        # rewrite never pairs new weights with the old description.
        (out / CONFIG).unlink(missing_ok=True)
        atomic_write(out / WEIGHTS, lambda f: f.write(blob))
        atomic_write_text(out / CONFIG, json.dumps({**description, "usjepa": source}, indent=2) + "\n")
    except OSError as exc:
        raise UserError(
            f"cannot write the export to {out} ({exc.strerror}); free disk space or choose a folder you can "
            "write to for OUT"
        ) from None
    return out


def _run(args: argparse.Namespace) -> int:
    out = export_encoder(args.run, args.out, args.checkpoint, args.force)
    source = json.loads((out / CONFIG).read_text())
    info, model_args = source["usjepa"], source["model_args"]
    size_mb = (out / WEIGHTS).stat().st_size / 1e6
    print(f"exported {info['checkpoint']} (step {info['step']}, {info['objective']}) of {args.run}")
    print(f"  {out / WEIGHTS}  ({size_mb:.1f} MB, fp32, timm names)")
    print(
        f"  {out / CONFIG}  (timm model_args, input [1, {model_args['img_size']}, {model_args['img_size']}] "
        f"gray pixels in [0, 1] -> (x - {PIXEL_MEAN}) / {PIXEL_STD})"
    )
    print("load it with timm (features: model.forward_features(x)):")
    print(f"  import json, safetensors.torch, timm; cfg = json.load(open({json.dumps(str(out / CONFIG))}))")
    print(
        "  model = timm.create_model(cfg['architecture'], pretrained=False, **cfg['model_args']); "
        f"model.load_state_dict(safetensors.torch.load_file({json.dumps(str(out / WEIGHTS))}))"
    )
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        description="Write a run's encoder as a timm state dict: OUT/encoder.safetensors (fp32) and "
        "OUT/config.json (timm create_model arguments, input normalisation, step, "
        "teacher fingerprint). Load it with timm, probe it with "
        "`usjepa probe RUN --backbone OUT`, or train against it with "
        "teacher.checkpoint=OUT/encoder.safetensors.",
    )
    p.add_argument("run", help="run dir of a `usjepa train` run (stage 1 or stage 2)")
    p.add_argument("out", help="folder to write (created; an earlier export there is replaced)")
    p.add_argument(
        "--checkpoint",
        default="latest",
        metavar="latest|best|step_N",
        help="which checkpoint: latest, best (lowest validation loss) or step_N; default latest",
    )
    p.add_argument("--force", action="store_true", help="write into OUT even if it holds other files")
    p.set_defaults(func=_run)
