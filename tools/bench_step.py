r"""How efficient is a training step? The SALT step in both predictor layouts, the MAE step and
two ceilings, measured in one run on this machine, plus the data path alone.

    python tools/bench_step.py                                    # ViT-Ti and ViT-S, 224 px, batch 16, fp32 and bf16
    python tools/bench_step.py --models tiny --precisions bf16 --steps 3
    python tools/bench_step.py --peak                             # the device's matmul peak (CPU default of perf/mfu)

Rows, for each model and precision:
- salt per_block / salt shared_context: `Trainer.train_step` of a SALT run (frozen teacher of
  the student's size, I-JEPA's masks: 4 target blocks of 15-20% of the grid, a context of
  85-100%), on one prefetched batch;
- mae: the stage-1 step (pixel targets, same masks and decoder);
- dense ceiling: forward + backward + AdamW of the same encoder on every patch (timm blocks,
  our attention layer), the best a step built from these blocks could reach per FLOP;
- plain-matmul ceiling: the same for a ViT of the same size written with plain matmuls
  (`PlainViT` below), the reference I-JEPA's kind of implementation.
Each row prints ms/step (median of `--steps` rounds after `--warmup`; a round times one step
of every row of a model and precision, so drift of the machine's speed hits all rows alike),
images/s, tokens trained on per image, model GFLOP/step (train/flops.py), achieved GFLOP/s
and its ratio to the faster ceiling. The data row decodes, augments and masks real shards (`--shards`, else synthetic
224 px shards built first) in one process: images/s per loader worker.
Figures, not assertions: run it on the machine you care about.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from usjepa.config import ModelConfig, load_config
from usjepa.models.vit import build_encoder
from usjepa.train.flops import encoder_forward_flops

MODELS = {"tiny": dict(embed_dim=192, depth=12, num_heads=3), "small": dict(embed_dim=384, depth=12, num_heads=6)}
# I-JEPA's masks: 4 target blocks of 15-20%, a context block of 85-100% (the US-JEPA defaults,
# docs/method.md#masks, use smaller targets of 7.5-12.5%).
MASKS = ["mask.target_scale=[0.15,0.2]", "mask.context_scale=[0.85,1.0]", "mask.min_keep=10"]


class PlainBlock(nn.Module):
    """A pre-norm ViT block from nn.Linear and explicit matmul attention (no fused kernels)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class PlainViT(nn.Module):
    def __init__(self, image_size: int, patch: int, embed_dim: int, depth: int, num_heads: int):
        super().__init__()
        self.embed = nn.Conv2d(1, embed_dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, embed_dim))
        self.blocks = nn.Sequential(*(PlainBlock(embed_dim, num_heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(images).flatten(2).transpose(1, 2) + self.pos))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_ms(steps: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, float]:
    """Median ms per call of each step, timed in rounds (one call of every step per round) so
    that a machine whose speed drifts over the minutes of a run (shared VMs do) slows every
    row alike and the ratios between rows stay meaningful."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            _sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def dense_step(model: nn.Module, images: torch.Tensor, precision: str) -> Callable[[], None]:
    """One forward + backward + AdamW step of `model` on every patch of `images`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            loss = model(images).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class TrainerStep:
    """`Trainer.train_step` of a run configured by `overrides`, on one prefetched batch; keeps
    the last outcome for its FLOPs and token counts."""

    def __init__(self, overrides: list[str]):
        from usjepa.data.pipeline import make_train_loader
        from usjepa.train.loop import Trainer

        self.trainer = Trainer(load_config("configs/demo.yaml", overrides))
        self.batch = next(make_train_loader(self.trainer.cfg, self.trainer.shard_set))
        self.last = None

    def __call__(self) -> None:
        self.last = self.trainer.train_step(self.batch)


def synthetic_shards(scratch: Path, size: int) -> Path:
    from usjepa.data.synth import GROUP_PATTERN, write_synthetic_dataset
    from usjepa.ingest.build.run import build_shards
    from usjepa.ingest.settings import BuildSettings

    write_synthetic_dataset(scratch / "data", n=160, size=size + 32, seed=0)
    build_shards(
        scratch / "data",
        scratch / "shards",
        BuildSettings(image_size=size, shard_size=40, group_pattern=GROUP_PATTERN),
        progress=False,
    )
    return scratch / "shards"


def data_row(overrides: list[str], batches: int) -> float:
    """Images/s of decode + augment + masks in one process (what one loader worker gives)."""
    from usjepa.data.pipeline import make_train_loader
    from usjepa.data.streams import ShardSet

    cfg = load_config("configs/demo.yaml", [*overrides, "data.num_workers=0"])
    loader = make_train_loader(cfg, ShardSet.load(cfg))
    next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * cfg.data.batch_size / (time.perf_counter() - t0)


def matmul_peak(device: torch.device) -> dict[str, float]:
    """TFLOP/s of a large square matmul in fp32 and bf16: the practical peak of `device`."""
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = 4096 if device.type == "cuda" else 2048
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        ms = interleaved_ms({name: lambda a=a, b=b: a @ b}, rounds=10, warmup=3)[name]
        peaks[name] = 2 * n**3 / (ms / 1000) / 1e12
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shards", help="a shard set for the data row and the steps (default: synthetic)")
    parser.add_argument("--peak", action="store_true", help="print the matmul peak of the device and exit")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    if args.peak:
        peaks = matmul_peak(device)
        print(
            f"{device}, {torch.get_num_threads()} threads: matmul peak fp32 {peaks['fp32']:.3f} TFLOP/s, "
            f"bf16 {peaks['bf16']:.3f} TFLOP/s"
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or str(synthetic_shards(Path(tmp), args.image_size))
        common = [
            f"data.shards={shards}",
            f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch}",
            "model.patch_size=16",
            "data.num_workers=0",
            "log.progress=false",
            "train.validate=false",
            f"run.device={device}",
            "teacher.checkpoint=none",
            "predictor.depth=6",
            "predictor.embed_dim=384",
            "predictor.num_heads=6",
            *MASKS,
        ]
        print(
            f"{device}, {torch.get_num_threads()} threads, {args.image_size} px, patch 16, batch {args.batch}, "
            f"predictor 6 x 384; median of {args.steps} interleaved rounds after {args.warmup}"
        )
        print(
            f"{'row':<34} {'ms/step':>9} {'img/s':>7} {'tok/img':>8} {'GFLOP/step':>11} {'GFLOP/s':>8} {'/ceiling':>9}"
        )
        for model in args.models.split(","):
            arch = [f"model.{k}={v}" for k, v in MODELS[model].items()]
            for precision in args.precisions.split(","):
                run = [
                    *common,
                    *arch,
                    f"train.precision={precision}",
                    "teacher.dtype=" + ("bf16" if precision == "bf16" else "fp32"),
                ]
                cfg = load_config("configs/demo.yaml", run)
                images = torch.randn(args.batch, 1, args.image_size, args.image_size, device=device)
                patches = (args.image_size // 16) ** 2
                dense_flops = (
                    3
                    * args.batch
                    * encoder_forward_flops(
                        build_encoder(ModelConfig(patch_size=16, **MODELS[model]), args.image_size), patches
                    )
                    / 1e9
                )
                ceilings = {
                    "dense ceiling (timm blocks)": dense_step(
                        build_encoder(
                            cfg.model,
                            args.image_size,
                            device=device,
                            dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                        ).to(device),
                        images,
                        precision,
                    ),
                    "plain-matmul ceiling": dense_step(
                        PlainViT(args.image_size, 16, **MODELS[model]).to(device), images, precision
                    ),
                }
                with tempfile.TemporaryDirectory() as runs:
                    trainers = {
                        name: TrainerStep([*run, *extra, f"run.dir={runs}/{i}"])
                        for i, (name, extra) in enumerate(
                            (
                                ("salt per_block", ["predictor.layout=per_block"]),
                                ("salt shared_context", ["predictor.layout=shared_context"]),
                                ("mae (shared_context)", ["train.objective=mae", "predictor.layout=shared_context"]),
                            )
                        )
                    }
                    ms = interleaved_ms({**trainers, **ceilings}, args.steps, args.warmup)
                rows = {
                    name: (ms[name], t.last.flops / 1e9, t.last.context_tokens + t.last.target_tokens)
                    for name, t in trainers.items()
                }
                rows.update({name: (ms[name], dense_flops, patches) for name in ceilings})
                best = max(dense_flops / (ms[name] / 1000) for name in ceilings)
                for name, (step_ms, gflop, tokens) in rows.items():
                    rate = gflop / (step_ms / 1000)
                    print(
                        f"{f'{model} {precision} {name}':<34} {step_ms:>9.1f} {1000 * args.batch / step_ms:>7.1f} "
                        f"{tokens:>8.1f} {gflop:>11.1f} {rate:>8.1f} {rate / best:>9.2f}"
                    )
                sys.stdout.flush()
        print(f"data path (decode + augment + masks, one process): {data_row(common, 8):.0f} images/s")


if __name__ == "__main__":
    main()
