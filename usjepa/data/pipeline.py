"""Shards -> augmented, masked batches, resumable at any step and on any world size.

The training data is an endless, deterministic stream of global batches: step k takes a
chunk of `data.batch_size / data.streams` samples from each logical stream (see
`streams.py` for who reads which shards). Inside a stream, samples are shuffled in a buffer
seeded by (seed, stream, epoch). So the position in the data is one number, the steps done:
a resumed loader skips whole epochs of a stream by arithmetic on the manifest's counts and
replays the raw tar records of the current epoch without decoding them.

Augmentations come from (seed, stream, step, sample) generators and masks from (seed, step,
sample id) ones, where the sample id is the position in the global batch; so what a batch
holds depends neither on the number of restarts nor on the ranks and workers that read it.
Masks keep their own lengths per sample and are padded into tensors with valid flags
(`collate_batch`); only I-JEPA's truncating collation (`mask.truncate_to_shortest`) needs the
lengths of the whole global batch, which in a distributed run takes one small all-gather.
"""

from __future__ import annotations

import itertools
import random
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from usjepa.config import Config
from usjepa.data.augment import augment, resize_eval, to_model_input
from usjepa.data.masks import collate_masks, mask_lengths, sample_masks, valid_patches
from usjepa.data.streams import ShardSet, StreamPlan
from usjepa.errors import UserError
from usjepa.shardset.manifest import Manifest
from usjepa.shardset.sample import decode_sample
from usjepa.signals import STOP_SIGNALS

VALIDATION_SEED = 1_000_003  # validation masks come from a seed no training batch uses
_TENSORS = ("images", "regions", "labels")


def _log_read_error(exn: Exception) -> bool:
    print(f"usjepa: skipping unreadable shard data: {exn}", file=sys.stderr)
    return True


class TrainParts(IterableDataset):
    """For each step from `start_step` on, the chunks of one reader's streams (a part of the
    rank's batch, masks not yet collated). Iterate through `make_train_loader`."""

    def __init__(self, cfg: Config, shard_set: ShardSet, plan: StreamPlan, start_step: int = 0):
        self.cfg, self.shard_set, self.plan, self.start_step = cfg, shard_set, plan, start_step

    def _raw_records(self, stream: int, skip: int) -> Iterator[dict]:
        """Endless shuffled raw (undecoded) records of one stream, after skipping `skip`."""
        seed, shards, epoch = self.cfg.run.seed, self.shard_set, 0
        while True:
            mine = shards.epoch_shards(seed, epoch, stream, self.plan.streams)
            in_epoch = sum(shards.counts[i] for i in mine)
            if skip >= in_epoch:  # skip a whole epoch without reading it
                skip -= in_epoch
                epoch += 1
                continue
            records = wds.tarfile_to_samples(handler=_log_read_error)([{"url": shards.paths[i]} for i in mine])
            rng = random.Random(f"{seed}-{stream}-{epoch}")
            buffered = wds.shuffle(self.cfg.data.shuffle_buffer, initial=self.cfg.data.shuffle_buffer, rng=rng)(records)
            read = 0
            for record in buffered:
                read += 1
                if skip:
                    skip -= 1
                    continue
                yield record
            self._check_epoch(stream, epoch, mine, read, in_epoch)
            epoch += 1

    def _check_epoch(self, stream: int, epoch: int, shards: list[int], read: int, expected: int) -> None:
        """Unreadable tar records are dropped by the reader, which the resume arithmetic (the
        manifest's counts) cannot know: say so, and stop a stream that reads nothing at all."""
        if read == expected:
            return
        names = ", ".join(Path(self.shard_set.paths[i]).name for i in shards)
        if not read:
            raise UserError(
                f"data stream {stream}: no readable record in its shards ({names}); "
                "run `usjepa shards verify` on the shard set"
            )
        print(
            f"usjepa: data stream {stream}, epoch {epoch}: read {read} records of the {expected} the manifest "
            f"lists for {names}; a resumed run will not see exactly the same data: run `usjepa shards verify`",
            file=sys.stderr,
        )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        chunk = self.plan.chunk
        streams = self.plan.worker_streams(info.id if info else 0)
        records = {s: self._raw_records(s, skip=self.start_step * chunk) for s in streams}
        step = self.start_step
        while True:
            yield join_parts(
                [decode_chunk(self.cfg, [next(records[s]) for _ in range(chunk)], step, stream=s) for s in streams]
            )
            step += 1


def decode_chunk(
    cfg: Config, records: list[dict], step: int, stream: int = 0, augmented: bool = True, mask_seed: int | None = None
) -> dict:
    """Decode, view (augmented, or just resized) and mask the chunk of `stream` in step `step`.

    Sample i of the chunk has id `stream * len(records) + i` (its place in the global batch).
    A record that fails to decode is skipped and counted in `corrupt`; the chunk is smaller.
    Masks stay per sample (`masks`) until `collate_batch`.
    """
    seed = cfg.run.seed
    mask_seed = seed if mask_seed is None else mask_seed
    size, patch = cfg.data.image_size, cfg.model.patch_size
    images, regions, labels, masks, ids, bad = [], [], [], [], [], 0
    for i, record in enumerate(records):
        try:
            image, region, meta = decode_sample(record)
        except ValueError as e:
            print(f"usjepa: skipping corrupt sample: {e}", file=sys.stderr)
            bad += 1
            continue
        image, region = torch.tensor(image)[None], torch.tensor(region)[None]
        if augmented:
            pixels, region = augment(
                np.random.default_rng([seed, stream, step, i]), image, region, cfg.data.augment, size
            )
        else:
            pixels, region = resize_eval(image, region, size)
        sample = stream * len(records) + i
        valid = valid_patches(region[0].numpy(), patch, cfg.mask.region_min_pixels)
        masks.append(sample_masks(cfg.mask, size // patch, mask_seed, step, sample, valid))
        ids.append(sample)
        images.append(to_model_input(pixels))
        regions.append(region)
        labels.append(int(meta.get("label", -1)))
    empty = torch.empty(0, 1, size, size)
    return {
        "images": torch.stack(images) if images else empty,
        "regions": torch.stack(regions) if regions else empty.bool(),
        "labels": torch.tensor(labels, dtype=torch.long),
        "masks": masks,
        "ids": ids,
        "corrupt": bad,
        "step": step,
        "mask_seed": mask_seed,
    }


def join_parts(parts: list[dict]) -> dict:
    """One step's parts (chunks, or the outputs of several loader workers) as one batch."""
    steps = {p["step"] for p in parts}
    assert len(steps) == 1, f"parts of different steps {sorted(steps)} joined: the loader order is broken"
    joined = {k: torch.cat([p[k] for p in parts]) for k in _TENSORS}
    joined.update(
        masks=[m for p in parts for m in p["masks"]],
        ids=[i for p in parts for i in p["ids"]],
        corrupt=sum(p["corrupt"] for p in parts),
        step=parts[0]["step"],
        mask_seed=parts[0]["mask_seed"],
    )
    return joined


def collate_batch(batch: dict, truncate_to: tuple[int, int] | None = None) -> dict:
    """`batch` with its masks collated (`MaskBatch`): `context` [B, Kc], `targets` [T, B, Kt]
    and their `context_valid` / `target_valid` flags.

    Every sampled patch is kept (padded to the longest mask), unless `truncate_to` (Kc, Kt),
    the smallest mask sizes of the global batch, asks for I-JEPA's cut.
    """
    if not batch["ids"]:
        raise UserError(
            f"step {batch['step']}: every sample of a batch failed to decode; "
            "run `usjepa shards verify` on the shard set"
        )
    masks = collate_masks(batch["masks"], batch["ids"], batch["mask_seed"], batch["step"], truncate_to)
    return {**batch, **vars(masks)}


def make_batch(
    cfg: Config, records: list[dict], step: int, augmented: bool = True, mask_seed: int | None = None
) -> dict:
    """One self-contained collated batch of `records` (validation, tools); with
    `mask.truncate_to_shortest` its masks are cut to the shortest of this batch."""
    batch = decode_chunk(cfg, records, step, augmented=augmented, mask_seed=mask_seed)
    truncate = cfg.mask.truncate_to_shortest and batch["ids"]
    return collate_batch(batch, mask_lengths(batch["masks"]) if truncate else None)


def _records(manifest: Manifest, split: str) -> Iterator[dict]:
    """Raw records of a split in manifest order."""
    return wds.tarfile_to_samples()([{"url": str(p)} for p in manifest.shard_paths(split)])


def validation_batches(
    cfg: Config,
    manifests: tuple[Manifest, ...],
    split: str = "val",
    max_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[int, dict]]:
    """(index, batch) of the un-augmented batches of a held-out split (of every shard set that
    has one), with masks fixed for the whole run, so the validation losses of two steps are
    measured on identical inputs and targets. Batch n belongs to rank n % world_size; the
    others' records are passed over without decoding."""
    records = (r for m in manifests if split in m.splits for r in _records(m, split))
    n = 0
    while not max_batches or n < max_batches:
        chunk = [r for _, r in zip(range(cfg.data.batch_size), records)]
        if not chunk:
            return
        if n % world_size == rank:
            yield n, make_batch(cfg, chunk, step=n, augmented=False, mask_seed=cfg.run.seed + VALIDATION_SEED)
        n += 1


def validation_batch_count(
    cfg: Config, manifests: tuple[Manifest, ...], split: str = "val", max_batches: int = 0
) -> int:
    samples = sum(m.count(split) for m in manifests if split in m.splits)
    batches = -(-samples // cfg.data.batch_size)
    return min(batches, max_batches) if max_batches else batches


def _ignore_stop_signals(worker: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR2/SIGINT to the training process, which saves and then
    shuts them down; Slurm and terminals signal every process of a job, workers included."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _unchanged(part: dict) -> dict:
    return part  # DataLoader's default conversion would turn the per-sample masks into tensors


def make_train_loader(
    cfg: Config, shard_set: ShardSet, start_step: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[dict]:
    """This rank's share of the batches of steps `start_step`, `start_step + 1`, ... (masks
    per sample; pass each through `collate_batch`)."""
    plan = StreamPlan.of(cfg, rank, world_size)
    workers = cfg.data.num_workers
    loader = DataLoader(
        TrainParts(cfg, shard_set, plan, start_step),
        batch_size=None,
        num_workers=workers,
        collate_fn=_unchanged,
        worker_init_fn=_ignore_stop_signals,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
    return _steps(iter(loader), plan.readers)


def _steps(parts: Iterator[dict], readers: int) -> Iterator[dict]:
    # DataLoader takes one item from each worker in turn, so one step's parts arrive together.
    while True:
        yield join_parts([next(parts) for _ in range(readers)])


def eval_samples(manifest: Manifest, split: str, image_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """(pixels [1, S, S] in [0, 1], region bool [1, S, S], metadata with `__key__`) of a split
    in manifest order, un-augmented: what probes and benchmarks see."""
    for record in _records(manifest, split):
        image, region, meta = decode_sample(record)
        pixels, region = resize_eval(torch.tensor(image)[None], torch.tensor(region)[None], image_size)
        yield pixels, region, {**meta, "__key__": record["__key__"]}


def eval_batches(
    manifest: Manifest, split: str, image_size: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of a split in manifest order, un-augmented: for probes and validation."""
    samples = eval_samples(manifest, split, image_size)
    while chunk := list(itertools.islice(samples, batch_size)):
        yield (
            torch.stack([to_model_input(pixels) for pixels, _, _ in chunk]),
            torch.tensor([int(meta["label"]) for _, _, meta in chunk]),
        )
