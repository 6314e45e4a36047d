"""`usjepa probe`: linear and kNN probes of a run's student, teacher, a random-init encoder,
an export, or a non-learned baseline (pixels, histogram)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from usjepa.config import parse_override
from usjepa.data.pipeline import eval_batches
from usjepa.errors import UserError
from usjepa.eval.backbones import BACKBONES, CHECKPOINTS, backbone_name, is_backbone, load_backbone
from usjepa.eval.features import extract_features
from usjepa.eval.probe import ProbeSplit, run_probe
from usjepa.eval.report import format_table, write_probe_report
from usjepa.rundir import resolve_device
from usjepa.shardset.manifest import load_manifest

SPLITS = ("train", "val", "test")


def probe_backbone(
    run_dir: Path,
    kind: str,
    shards: str | None = None,
    out_dir: Path | None = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    progress: bool = True,
    checkpoint: str = "best",
) -> dict:
    """Extract features of every split with backbone `kind` of `run_dir` (or export folder
    `kind`), train the probes, write `<out_dir>/<name>.json` and its confusion-matrix plot
    (name: `kind`, or the export folder's name); return the result.

    `overrides` (probe.* only) change the run's probe settings for this call."""
    for text in overrides:
        if not parse_override(text)[0].startswith("probe."):
            raise UserError(f"override '{text}': `usjepa probe` takes probe.* settings only (e.g. probe.seeds=[0,1])")
    dev = resolve_device(device)
    encoder, cfg = load_backbone(kind, Path(run_dir), dev, overrides, checkpoint)
    probe = cfg.probe
    manifest = load_manifest(shards or cfg.data.shards)
    # Every backbone is probed in fp32 (the teacher trains in bf16), so that precision never
    # decides a comparison between them.
    encoder = encoder.float()
    splits = {}
    for split in SPLITS:
        batches = eval_batches(manifest, split, cfg.data.image_size, probe.extract_batch_size)
        x, y = extract_features(encoder, batches, dev, progress=progress, desc=f"{kind} {split}")
        splits[split] = ProbeSplit(x, y)
    result = run_probe(splits, manifest.classes, probe, dev)
    name = backbone_name(kind)
    result.update(
        backbone=name,
        run_dir=str(run_dir),
        shards=str(manifest.root),
        checkpoint=checkpoint if kind in ("student", "target") else None,
        export=None if kind in BACKBONES else str(Path(kind).resolve()),
    )
    write_probe_report(result, out_dir or Path(run_dir) / "probe", name)
    return result


def _backbone_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if not is_backbone(n)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"'{text}': choose from {', '.join(BACKBONES)} or export folders (usjepa export), comma-separated"
        )
    return names


def _run(args: argparse.Namespace) -> int:
    results = {}
    for kind in args.backbone:
        start = time.perf_counter()
        result = probe_backbone(
            Path(args.run),
            kind,
            args.shards,
            args.out and Path(args.out),
            args.overrides,
            args.device,
            checkpoint=args.checkpoint,
        )
        results[result["backbone"]] = result
        print(
            f"{result['backbone']}: macro-F1 {100 * result['macro_f1_mean']:.1f}, "
            f"kNN {100 * result['knn']['macro_f1']:.1f} ({time.perf_counter() - start:.0f} s)"
        )
    print(format_table(results))
    print(f"reports: {Path(args.out) if args.out else Path(args.run) / 'probe'}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe",
        description="Frozen encoder -> mean-pooled last-layer tokens -> one linear layer "
        "(AdamW 1e-3, wd 1e-4, batch 32, cosine, early stopping on val loss, 5 seeds), "
        "as in the US-JEPA paper (docs/method.md#probe-protocol), and a weighted kNN probe "
        "(DINO; probe.knn_k, default 20, probe.knn_temperature, default 0.07), both scored on val and test. "
        "Writes <out>/<backbone>.json and a confusion-matrix PNG.",
    )
    p.add_argument("run", help="run dir of a `usjepa train` run (its config gives the architecture and image size)")
    p.add_argument(
        "--backbone",
        type=_backbone_list,
        default=["student"],
        metavar="NAME[,NAME...]",
        help=f"which encoder(s) to probe, comma-separated, from {', '.join(BACKBONES)} or folders "
        "written by `usjepa export` (default: student); pixels (the image area-averaged "
        "to probe.pixels_size^2 values) and histogram (in-region intensities in "
        "probe.histogram_bins bins) are non-learned baselines",
    )
    p.add_argument("--shards", help="labelled shard set to probe on (default: the run's data.shards)")
    p.add_argument("--out", help="where to write the reports (default: RUN/probe)")
    p.add_argument(
        "--checkpoint",
        choices=CHECKPOINTS,
        default="best",
        help="the checkpoint of the student (or EMA target): best (lowest validation loss, the "
        "paper's choice; the latest where none was validated) or latest; default best",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="probe.KEY=VALUE",
        help="probe settings, e.g. probe.seeds=[0,1,2] probe.max_epochs=50 probe.knn_k=10",
    )
    p.set_defaults(func=_run)
