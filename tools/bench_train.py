r"""Training throughput at world size 1 and 2 (or any list): images/s, where a step's time goes
(data wait, teacher, student forward+backward, optimizer) and peak memory per rank.

    python tools/bench_train.py                                  # demo model, synthetic shards
    python tools/bench_train.py configs/demo.yaml --world 1,2 data.shards=demo_out/shards \
        teacher.checkpoint=demo_out/runs/teacher

Each world size is a real launch (`torchrun --standalone` for more than one rank) of the
trainer's own step on the config, `--warmup` untimed steps then `--steps` timed ones, in a
scratch run dir. Without `data.shards=...` a small synthetic shard set is built first.
Figures, not assertions: run it on the machine you care about. On CUDA every phase end waits
for the GPU, so the split is exact but the total a little slower than a real run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULTS = ["data.streams=2", "teacher.checkpoint=none", "log.progress=false", "train.validate=false"]


def _worker(args: argparse.Namespace) -> None:
    """One rank: time the trainer's steps, rank 0 writes everyone's figures to `args.worker`."""
    from usjepa.config import load_config
    from usjepa.data.pipeline import make_train_loader
    from usjepa.train.distributed import shutdown_distributed
    from usjepa.train.loop import Trainer
    from usjepa.train.meter import Meter, peak_memory_gib

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    world = trainer.world
    batches = make_train_loader(cfg, trainer.shard_set, 0, world.rank, world.size)
    meter = Meter(trainer.device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            meter.read_and_reset()
        meter.begin_step(timed=True)
        with meter.phase("data"):
            batch = next(batches)
        outcome = trainer.train_step(batch, meter)
        meter.count(cfg.data.batch_size, outcome.flops)
    figures = {
        **meter.read_and_reset(),
        "peak_memory_gib": peak_memory_gib(trainer.device),
        "device": str(trainer.device),
        "micro_batches": trainer.micro_batches,
    }
    everyone = world.gather_objects(figures)
    if world.is_main:
        Path(args.worker).write_text(json.dumps({"world": world.size, "ranks": everyone}))
    shutdown_distributed()


def _launch(world: int, args: argparse.Namespace, overrides: list[str], scratch: Path) -> dict:
    out = scratch / f"world{world}.json"
    script = [
        str(Path(__file__).resolve()),
        "--worker",
        str(out),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        args.config,
        *overrides,
        f"run.dir={scratch / f'run{world}'}",
    ]
    launcher = (
        [sys.executable]
        if world == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([*launcher, *script], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"world size {world} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--world", default="1,2", help="world sizes to measure, e.g. 1,2 (default)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args()  # KEY=VALUE overrides before or after the options
    if args.worker:
        return _worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        overrides = [*DEFAULTS, *args.overrides]
        if not any(o.startswith("data.shards=") for o in args.overrides):
            from usjepa.demo import demo_shards

            overrides.append(f"data.shards={demo_shards(scratch, images=400, progress=False)}")
        results = [_launch(int(w), args, overrides, scratch) for w in args.world.split(",")]
    print(
        f"{args.config} {' '.join(args.overrides)}: {args.steps} timed steps after {args.warmup}, "
        f"{results[0]['ranks'][0]['device']}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}"
    )
    print(
        f"{'ranks':>5} {'images/s':>9} {'TFLOP/s':>8} {'step ms':>8} {'data':>6} {'teacher':>8} {'student':>8}"
        f" {'optim':>6} {'peak GiB/rank':>14}"
    )
    for r in results:
        rank0 = r["ranks"][0]
        ms = {k: 1000 * rank0[f"{k}_s"] for k in ("step_time", "data", "teacher", "student", "optimizer")}
        peak = max(x["peak_memory_gib"] for x in r["ranks"])
        print(
            f"{r['world']:>5} {rank0['images_per_s']:>9.0f} {rank0['tflop_per_s']:>8.3f} {ms['step_time']:>8.1f} "
            f"{ms['data']:>6.1f} "
            f"{ms['teacher']:>8.1f} {ms['student']:>8.1f} {ms['optimizer']:>6.1f} {peak:>14.2f}"
        )


if __name__ == "__main__":
    main()
