"""Feature-extraction throughput of frozen encoders, what `usjepa bench` spends most of its
time on: images/s per backbone size and dtype on this machine, and what that makes of the
8 UltraBench sets (all splits, plus the degraded test views of the robustness protocol).

    python tools/bench_extract.py                         # ViT-Ti/S/B at 224 px, fp32 and bf16
    python tools/bench_extract.py --models vit_base_patch16_224 --batches 2

Figures, not assertions: run it on the machine you care about.
"""

from __future__ import annotations

import argparse
import time

import torch

from usjepa.bench.loaders import load_external
from usjepa.eval.features import extract_features
from usjepa.rundir import resolve_device

# Images per set (train + val + test) and test images, from the recipes in shards/.
ULTRABENCH = {
    "aul": (735, 147),
    "busbra": (1064, 213),
    "butterfly": (41076, 6751),
    "fatty_liver": (550, 110),
    "gbcu": (1255, 122),
    "mmotu": (1469, 469),
    "pocus": (2064, 443),
    "tn5000": (5000, 1000),
}
ROBUSTNESS_VIEWS = 9  # 3 kinds x severities 1-3


def images_per_s(model: str, size: int, batch: int, batches: int, device: torch.device, dtype: torch.dtype) -> float:
    encoder = load_external("timm", None, model, size).module.to(device)
    images = torch.randn(batch, 1, size, size)
    data = [(images, torch.zeros(batch, dtype=torch.long))]
    extract_features(encoder, data, device, dtype)  # warm-up
    start = time.perf_counter()
    extract_features(encoder, data * batches, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_tiny_patch16_224,vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    clean = sum(n for n, _ in ULTRABENCH.values())
    degraded = ROBUSTNESS_VIEWS * sum(t for _, t in ULTRABENCH.values())
    print(f"{device.type}, {torch.get_num_threads()} threads, {args.image_size} px, batch {args.batch}")
    print(f"{'model':26} {'dtype':5} {'img/s':>7} {'8 sets, linear+kNN':>19} {'+ robustness':>13}")
    for model in args.models.split(","):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rate = images_per_s(model, args.image_size, args.batch, args.batches, device, dtype)
            minutes, with_views = clean / rate / 60, (clean + degraded) / rate / 60
            print(f"{model:26} {name:5} {rate:7.1f} {minutes:15.0f} min {with_views:9.0f} min")


if __name__ == "__main__":
    main()
