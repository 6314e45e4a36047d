"""Shards -> augmented, masked batches, resumable at any batch.

The training data is an endless, deterministic stream of batches. With W loader workers a
rank has W logical streams; stream s owns the shards `order[rank*W + s :: world*W]` of each
epoch's permutation (seeded by (seed, epoch)) and shuffles their samples in a buffer seeded
by (seed, stream, epoch). Batch b of a rank comes from stream b % W, which is exactly the
round-robin order in which torch's DataLoader collects worker outputs. So the position in
the data is one number, the batches consumed, and a resumed loader starts every worker at
its next batch: whole epochs are skipped by arithmetic on the manifest's counts, and
inside an epoch the raw tar records are replayed without decoding.

Augmentations and masks are drawn from (seed, rank, batch, sample) generators, so what a
batch holds does not depend on the number of restarts.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from usjepa.config import Config
from usjepa.data.augment import augment, resize_eval, to_model_input
from usjepa.data.masks import collate_masks, sample_masks, valid_patches
from usjepa.errors import UserError
from usjepa.ingest.manifest import Manifest
from usjepa.ingest.sample_format import decode_sample


VALIDATION_SEED = 1_000_003  # validation masks come from a seed no training batch uses


@dataclass(frozen=True)
class StreamLayout:
    """Which logical stream a DataLoader worker plays after a resume at `start_batch`."""

    stream: int  # logical stream of this worker, in [0, workers)
    first_local_batch: int  # index of its first batch within that stream

    @staticmethod
    def of(worker: int, workers: int, start_batch: int) -> "StreamLayout":
        return StreamLayout(stream=(start_batch + worker) % workers,
                            first_local_batch=(start_batch + worker) // workers)


def _log_read_error(exn: Exception) -> bool:
    print(f"usjepa: skipping unreadable shard data: {exn}", file=sys.stderr)
    return True


class TrainBatches(IterableDataset):
    """Endless batches for one rank. Iterate through `make_train_loader`."""

    def __init__(self, cfg: Config, manifest: Manifest, rank: int = 0, world_size: int = 1,
                 workers: int = 1, start_batch: int = 0):
        self.cfg = cfg
        self.shards = [str(p) for p in manifest.shard_paths(cfg.data.split)]
        self.counts = [s.count for s in manifest.splits[cfg.data.split].shards]
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.start_batch = start_batch
        streams = self.world_size * self.workers
        if len(self.shards) < streams:
            raise UserError(f"{manifest.root}: split '{cfg.data.split}' has {len(self.shards)} shards but "
                            f"{self.world_size} ranks x {self.workers} workers need at least {streams}; "
                            "lower data.num_workers or rebuild with a smaller --shard-size")

    # -- raw records ------------------------------------------------------------------------
    def _stream_shards(self, stream_id: int, epoch: int) -> list[int]:
        order = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(len(self.shards))
        return [int(i) for i in order[stream_id :: self.world_size * self.workers]]

    def _raw_records(self, stream_id: int, skip: int) -> Iterator[dict]:
        """Endless shuffled raw (undecoded) records of one stream, after skipping `skip`."""
        epoch = 0
        while True:
            mine = self._stream_shards(stream_id, epoch)
            in_epoch = sum(self.counts[i] for i in mine)
            if skip >= in_epoch:  # skip a whole epoch without reading it
                skip -= in_epoch
                epoch += 1
                continue
            records = wds.tarfile_to_samples(handler=_log_read_error)([{"url": self.shards[i]} for i in mine])
            rng = random.Random(f"{self.cfg.run.seed}-{stream_id}-{epoch}")
            buffered = wds.shuffle(self.cfg.data.shuffle_buffer, initial=self.cfg.data.shuffle_buffer,
                                   rng=rng)(records)
            for record in buffered:
                if skip:
                    skip -= 1
                    continue
                yield record
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        layout = StreamLayout.of(worker, self.workers, self.start_batch)
        batch_size = self.cfg.data.batch_size
        stream_id = self.rank * self.workers + layout.stream
        records = self._raw_records(stream_id, skip=layout.first_local_batch * batch_size)
        local = layout.first_local_batch
        while True:
            chunk = [next(records) for _ in range(batch_size)]
            yield make_batch(self.cfg, chunk, batch_index=local * self.workers + layout.stream, rank=self.rank)
            local += 1


def make_batch(cfg: Config, records: list[dict], batch_index: int, rank: int = 0, augmented: bool = True,
               mask_seed: int | None = None) -> dict:
    """Decode, view (augmented, or just resized) and mask one batch of raw records.

    A record that fails to decode is skipped and counted in `corrupt`; the batch is smaller.
    """
    seed = cfg.run.seed
    mask_seed = seed if mask_seed is None else mask_seed
    size, patch = cfg.data.image_size, cfg.model.patch_size
    images, regions, labels, masks, bad = [], [], [], [], 0
    for i, record in enumerate(records):
        try:
            image, region, meta = decode_sample(record)
        except ValueError as e:
            print(f"usjepa: skipping corrupt sample: {e}", file=sys.stderr)
            bad += 1
            continue
        image, region = torch.tensor(image)[None], torch.tensor(region)[None]
        if augmented:
            rng = np.random.default_rng([seed, rank, batch_index, i])
            pixels, region = augment(rng, image, region, cfg.data.augment, size)
        else:
            pixels, region = resize_eval(image, region, size)
        valid = valid_patches(region[0].numpy(), patch, cfg.mask.region_min_pixels)
        sample = rank * len(records) + i
        masks.append(sample_masks(cfg.mask, size // patch, mask_seed, batch_index, sample, valid))
        images.append(pixels)
        regions.append(region)
        labels.append(int(meta.get("label", -1)))
    if not images:
        raise UserError(f"batch {batch_index}: all {len(records)} samples failed to decode; "
                        "run `usjepa shards verify` on the shard set")
    context, targets = collate_masks(masks, mask_seed, batch_index)
    return {"images": to_model_input(torch.stack(images)), "regions": torch.stack(regions),
            "labels": torch.tensor(labels), "context": context, "targets": targets,
            "batch_index": batch_index, "corrupt": bad}


def _records(manifest: Manifest, split: str) -> Iterator[dict]:
    """Raw records of a split in manifest order."""
    return wds.tarfile_to_samples()([{"url": str(p)} for p in manifest.shard_paths(split)])


def validation_batches(cfg: Config, manifest: Manifest, split: str = "val", max_batches: int = 0) -> Iterator[dict]:
    """Un-augmented batches of a held-out split with masks fixed for the whole run, so that
    the validation loss of two steps is measured on identical inputs and targets."""
    records, n = _records(manifest, split), 0
    while not max_batches or n < max_batches:
        chunk = [r for _, r in zip(range(cfg.data.batch_size), records)]
        if not chunk:
            return
        yield make_batch(cfg, chunk, batch_index=n, augmented=False, mask_seed=cfg.run.seed + VALIDATION_SEED)
        n += 1


def make_train_loader(cfg: Config, manifest: Manifest, start_batch: int = 0, rank: int = 0,
                      world_size: int = 1) -> DataLoader:
    """DataLoader over `TrainBatches` whose n-th batch is batch `start_batch + n` of the run."""
    workers = cfg.data.num_workers
    dataset = TrainBatches(cfg, manifest, rank, world_size, workers, start_batch)
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      prefetch_factor=2 if workers else None, persistent_workers=False)


def eval_batches(manifest: Manifest, split: str, image_size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of a split in manifest order, un-augmented: for probes and validation."""
    images, labels = [], []
    for record in _records(manifest, split):
        image, region, meta = decode_sample(record)
        pixels, _ = resize_eval(torch.tensor(image)[None], torch.tensor(region)[None], image_size)
        images.append(to_model_input(pixels))
        labels.append(int(meta["label"]))
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)
