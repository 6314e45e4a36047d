"""Features of one backbone on one split, extracted once and cached on disk.

A cache entry is named by the sha256 of everything its numbers depend on: the backbone's
weights (a hash of its state dict, so a retrained or swapped checkpoint is re-extracted
whatever its file is called), its preprocessing (input size, pooling, normalisation), the
shard set (the manifest's sha256, which holds every shard's checksum), the split and the
test-time degradation. Adding a backbone, a seed or a protocol re-extracts nothing else, and
an interrupted bench keeps every split it finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from usjepa.bench.protocols import degrade
from usjepa.data.augment import to_model_input
from usjepa.data.pipeline import eval_samples
from usjepa.eval.features import extract_features
from usjepa.eval.probe import ProbeSplit
from usjepa.fileio import atomic_write
from usjepa.shardset.manifest import Manifest

CACHE_FORMAT = 1


@dataclass
class SplitFeatures:
    features: np.ndarray  # float32 [N, D], mean-pooled last-layer tokens
    labels: np.ndarray  # int64 [N]
    groups: np.ndarray  # str [N]: patient (or image) a sample belongs to
    videos: np.ndarray  # str [N]: the video a frame came from, else its group

    def probe_split(self, rows: np.ndarray | None = None) -> ProbeSplit:
        if rows is None:
            return ProbeSplit(self.features, self.labels)
        return ProbeSplit(self.features[rows], self.labels[rows])


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def video_id(meta: dict) -> str:
    """Frames of one cine loop share their source file; other samples stand for their group
    (POCUS-style sets store each frame as an image and name its video as the group)."""
    if meta.get("frame") is not None:
        return str(meta["source"])
    return str(meta["group"])


def sample_seed(key: str, severity: int) -> int:
    """The degradation seed of a sample: fixed by its key, so it does not depend on order."""
    return zlib.crc32(f"{key}/{severity}".encode())


def _batches(
    manifest: Manifest, split: str, image_size: int, batch_size: int, view: tuple[str, int] | None, ids: list[dict]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Model-input batches of a split, optionally degraded; each sample's metadata goes to `ids`."""
    images, labels = [], []
    for pixels, region, meta in eval_samples(manifest, split, image_size):
        if view is not None:
            pixels = degrade(pixels, region, view[0], view[1], sample_seed(meta["__key__"], view[1]))
        images.append(to_model_input(pixels))
        labels.append(int(meta["label"]))
        ids.append(meta)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


class FeatureCache:
    """`root/<sha256>.npz` per (backbone weights, preprocessing, shard set, split, view)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = self.misses = 0

    def key(self, fields: dict) -> str:
        return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True).encode()).hexdigest()

    def get(self, fields: dict, extract: Callable[[], SplitFeatures]) -> SplitFeatures:
        path = self.root / f"{self.key(fields)}.npz"
        if path.is_file():
            self.hits += 1
            with np.load(path, allow_pickle=False) as f:
                return SplitFeatures(f["features"], f["labels"], f["groups"], f["videos"])
        self.misses += 1
        found = extract()
        self.root.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **vars(found))
        atomic_write(path, lambda f: f.write(buffer.getvalue()))
        return found


def extract_split(
    encoder: torch.nn.Module,
    manifest: Manifest,
    split: str,
    image_size: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    view: tuple[str, int] | None = None,
    desc: str = "",
    progress: bool = True,
) -> SplitFeatures:
    """Features of `split` (degraded by `view` = (kind, severity) when given), in manifest order."""
    ids: list[dict] = []
    features, labels = extract_features(
        encoder,
        _batches(manifest, split, image_size, batch_size, view, ids),
        device,
        dtype,
        progress=progress,
        desc=desc,
    )
    return SplitFeatures(
        features, labels, np.array([str(m["group"]) for m in ids]), np.array([video_id(m) for m in ids])
    )
