"""Training throughput of a config on this machine: images/s and where a step's time goes.

    python tools/bench_train.py configs/demo.yaml data.shards=demo_out/shards teacher.checkpoint=demo_out/runs/teacher

Runs `--steps` optimizer steps (after `--warmup` untimed ones) in a scratch run dir and prints
the mean time per step of each phase. Figures, not assertions: run it on the machine you
care about.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from usjepa.config import load_config
from usjepa.data.pipeline import make_train_loader
from usjepa.train.loop import Trainer
from usjepa.train.objectives import pixel_targets, regression_loss, teacher_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(args.config, [*args.overrides, f"run.dir={scratch}"])
        trainer = Trainer(cfg)
        batches = iter(make_train_loader(cfg, trainer.manifest))
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        phases = {"data": 0.0, "targets": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        images = 0
        for step in range(args.warmup + args.steps):
            marks = [time.perf_counter()]
            batch = next(batches)
            marks.append(time.perf_counter())
            images_dev = batch["images"].to(trainer.device)
            context, tgt_idx = batch["context"].to(trainer.device), batch["targets"].to(trainer.device)
            if cfg.train.objective == "salt":
                target = teacher_targets(trainer.teacher, images_dev, tgt_idx, cfg.teacher.layernorm_targets)
            else:
                target = pixel_targets(images_dev, cfg.model.patch_size, tgt_idx, cfg.train.norm_pix_targets)
            sync()
            marks.append(time.perf_counter())
            with trainer.autocast:
                pred = trainer.student.predictor(trainer.student.encoder(images_dev, context), context, tgt_idx)
            loss = regression_loss(pred, target, cfg.train)
            sync()
            marks.append(time.perf_counter())
            loss.backward()
            sync()
            marks.append(time.perf_counter())
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            sync()
            marks.append(time.perf_counter())
            if step >= args.warmup:
                images += batch["images"].shape[0]
                for name, a, b in zip(phases, marks, marks[1:]):
                    phases[name] += b - a
        total = sum(phases.values())
        print(f"{cfg.train.objective} on {trainer.device}, batch {cfg.data.batch_size}, "
              f"{cfg.data.image_size} px, {args.steps} steps, {torch.get_num_threads()} threads")
        for name, seconds in phases.items():
            print(f"  {name:<10} {1000 * seconds / args.steps:8.1f} ms/step  ({100 * seconds / total:4.1f}%)")
        print(f"  {'total':<10} {1000 * total / args.steps:8.1f} ms/step   {images / total:.0f} images/s")


if __name__ == "__main__":
    main()
