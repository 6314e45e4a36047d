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

import atexit
import itertools
import multiprocessing
import os
import random
import re
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from usjepa.config import Config
from usjepa.data.augment import augment, resize_eval, to_model_input
from usjepa.data.masks import collate_masks, mask_lengths, sample_masks, valid_patches
from usjepa.data.streams import ShardSet, StreamPlan, shard_problem
from usjepa.errors import UserError
from usjepa.fileio import files_sha256
from usjepa.shardset.manifest import Manifest
from usjepa.shardset.sample import decode_sample
from usjepa.signals import STOP_SIGNALS

VALIDATION_SEED = 1_000_003  # validation masks come from a seed no training batch uses
_TENSORS = ("images", "regions", "labels")
_USER_ERROR = "user_error"  # a part that carries a reader's UserError instead of samples


class RunWarnings:
    """What a run says about the data it skips: each distinct warning once, when it is first
    seen, and at the end (`summary`) how often each one that repeated came. Readers (loader
    workers, or the training process itself with data.num_workers=0) print nothing: their
    warnings travel with the data (a part's `warnings`, one entry per occurrence) to the
    process that consumes it, so a warning is said once per run, not once per reader or epoch."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def say(self, warnings: list[str]) -> None:
        for text in warnings:
            if not self.seen[text]:
                print(text, file=sys.stderr)
            self.seen[text] += 1

    def summary(self) -> None:
        for text, count in self.seen.items():
            if count > 1:
                print(f"{text}: {count} times in this run", file=sys.stderr)


# Warnings of batches made outside a TrainLoader (validation): said once per process.
_PROCESS_WARNINGS = RunWarnings()


class ShardCheck:
    """What one loader process does with bad shards (data.on_bad_shard). Each shard is checked
    against the manifest's sha256 when the process first opens it. `error`: a shard that is
    missing, unreadable or changed, or a tar record that cannot be read, stops the run. `skip`:
    a missing or unreadable shard is left out, a changed one is read with its undecodable
    samples skipped and counted. Each time such a shard is reached, and each unreadable
    record, adds a line to `warnings`, which the reader sends on with its next part (`take`)."""

    def __init__(self, shard_set: ShardSet, on_bad_shard: str):
        self.shard_set, self.skip = shard_set, on_bad_shard == "skip"
        self.readable: dict[int, bool] = {}  # shard index -> whether it is read
        self.problems: dict[int, str] = {}  # shard index -> its warning (skip: left out, or changed)
        self.read_errors: Counter[str] = Counter()
        self.warnings: list[str] = []  # not yet sent

    def _check(self, index: int) -> bool:
        path = Path(self.shard_set.paths[index])
        problem = shard_problem(path)
        if problem:
            self.problems[index] = self._bad(f"{path}: {problem}", "left out")
            return False
        expected = self.shard_set.sha256s[index] if self.shard_set.sha256s else ""
        if expected and files_sha256([path]) != expected:
            self.problems[index] = self._bad(
                f"{path}: sha256 differs from the manifest", "read, its undecodable samples skipped"
            )
        return True

    def urls(self, indices: list[int]) -> Iterator[dict]:
        """The shards of `indices` that may be read, checked as they are reached."""
        for index in indices:
            if index not in self.readable:
                self.readable[index] = self._check(index)
            if index in self.problems:
                self.warnings.append(self.problems[index])
            if self.readable[index]:
                yield {"url": self.shard_set.paths[index]}

    def _bad(self, what: str, done: str) -> str:
        """The warning of a bad shard or record (data.on_bad_shard=skip); a UserError otherwise."""
        if not self.skip:
            raise UserError(
                f"shard {what}; rebuild or restore it (usjepa shards verify checks a set), or set "
                "data.on_bad_shard=skip to train on what can be read"
            )
        return f"usjepa: shard {what}: {done} (data.on_bad_shard=skip)"

    def read_error(self, exn: Exception) -> bool:
        """webdataset's handler of a record it cannot read: True to go on."""
        message = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        self.warnings.append(self._bad(f"data that cannot be read ({message})", "skipped"))
        self.read_errors[message] += 1
        return True

    def take(self) -> list[str]:
        """The warnings not yet sent, to go with the next part."""
        warnings, self.warnings = self.warnings, []
        return warnings


class TrainParts(IterableDataset):
    """For each step from `start_step` on, the chunks of one reader's streams (a part of the
    rank's batch, masks not yet collated). Iterate through `make_train_loader`."""

    def __init__(self, cfg: Config, shard_set: ShardSet, plan: StreamPlan, start_step: int = 0):
        self.cfg, self.shard_set, self.plan, self.start_step = cfg, shard_set, plan, start_step
        self.check = ShardCheck(shard_set, cfg.data.on_bad_shard)
        self.short_streams: set[int] = set()  # streams whose short epochs were reported

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
            records = wds.tarfile_to_samples(handler=self.check.read_error)(self.check.urls(mine))
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
        if stream in self.short_streams:
            return
        self.short_streams.add(stream)
        errors = ", ".join(f"{n} x {m}" for m, n in self.check.read_errors.items()) or "none"
        self.check.warnings.append(
            f"usjepa: data stream {stream}, epoch {epoch}: read {read} records of the {expected} the manifest "
            f"lists for {names} (read errors: {errors}); a resumed run will not see exactly the same data: run "
            "`usjepa shards verify` (said once per stream)"
        )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        chunk = self.plan.chunk
        streams = self.plan.worker_streams(info.id if info else 0)
        records = {s: self._raw_records(s, skip=self.start_step * chunk) for s in streams}
        step = self.start_step
        while True:
            try:
                part = join_parts(
                    [decode_chunk(self.cfg, [next(records[s]) for _ in range(chunk)], step, stream=s) for s in streams]
                )
            except UserError as e:
                # As data, not as an exception: DataLoader would re-raise it wrapped in the
                # worker's traceback, and the user's one-line message would be lost in it.
                yield {_USER_ERROR: str(e), "warnings": self.check.take()}
                return
            part["warnings"] = self.check.take() + part["warnings"]  # the shards' first: they were opened first
            yield part
            step += 1


def decode_chunk(
    cfg: Config, records: list[dict], step: int, stream: int = 0, augmented: bool = True, mask_seed: int | None = None
) -> dict:
    """Decode, view (augmented, or just resized) and mask the chunk of `stream` in step `step`.

    Sample i of the chunk has id `stream * len(records) + i` (its place in the global batch).
    A record that fails to decode is skipped and counted in `corrupt` (the chunk is smaller),
    with a line in `warnings` for whoever consumes the chunk to say (`RunWarnings`).
    Masks stay per sample (`masks`) until `collate_batch`.
    """
    seed = cfg.run.seed
    mask_seed = seed if mask_seed is None else mask_seed
    size, patch = cfg.data.image_size, cfg.model.patch_size
    images, regions, labels, masks, ids, warnings = [], [], [], [], [], []
    for i, record in enumerate(records):
        try:
            image, region, meta = decode_sample(record)
        except ValueError as e:
            warnings.append(f"usjepa: skipping corrupt sample: {e}")
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
        "corrupt": len(warnings),
        "warnings": warnings,
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
        warnings=[w for p in parts for w in p["warnings"]],
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
    cfg: Config,
    records: list[dict],
    step: int,
    augmented: bool = True,
    mask_seed: int | None = None,
    warnings: RunWarnings = _PROCESS_WARNINGS,
) -> dict:
    """One self-contained collated batch of `records` (validation, tools); with
    `mask.truncate_to_shortest` its masks are cut to the shortest of this batch. Its warnings
    (corrupt samples) are said through `warnings`: by default once per process."""
    batch = decode_chunk(cfg, records, step, augmented=augmented, mask_seed=mask_seed)
    warnings.say(batch.pop("warnings"))
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


class _WorkerSignals:
    """Loader workers leave the stop signals (STOP_SIGNALS) to the training process, which saves and then
    shuts them down (Slurm and terminals signal every process of a job, workers included). Once
    the training process is stopping (the loader closed, or the interpreter exiting after an
    error) a signal ends a worker as usual: multiprocessing's exit terminates daemonic children
    and then waits for them, which would wait forever on a worker that ignores SIGTERM."""

    def __init__(self) -> None:
        self.stopping = multiprocessing.RawValue("b", 0)  # lock-free: read inside a signal handler

    def __call__(self, worker: int) -> None:  # DataLoader's worker_init_fn
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.stopping.value:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def stop(self) -> None:
        self.stopping.value = 1


def _unchanged(part: dict) -> dict:
    return part  # DataLoader's default conversion would turn the per-sample masks into tensors


# torch's errors for a loader worker that died: from its SIGCHLD handler, which raises in the
# training process wherever it is (`is killed by signal: Killed. `, `exited unexpectedly with
# exit code 1. ...`), and from the DataLoader's own check (`(pid(s) 1234) exited unexpectedly`).
_WORKER_DIED = re.compile(
    r"^DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) "
    r"(?:is killed by signal: (.+?)\. |exited unexpectedly(?: with exit code (-?\d+))?)"
)
_SIGNAL_NAMES = {signal.strsignal(s): s for s in signal.Signals}  # "Killed" -> SIGKILL
_SIGNAL_HINTS = {
    signal.SIGKILL: "out of memory?",
    signal.SIGBUS: "SIGBUS: out of shared memory? raise the size of /dev/shm",
}


def worker_death(error: BaseException | None) -> UserError | None:
    """The one-line UserError for torch's RuntimeError that a loader worker died (the OOM
    killer's kill -9, say), found along the exception's chain; None for any other error."""
    found = []
    while isinstance(error, BaseException) and len(found) < 10:
        if isinstance(error, RuntimeError) and (m := _WORKER_DIED.match(str(error))):
            found.append(m)
        error = error.__cause__ or error.__context__
    if not found:
        return None
    # The most telling of the chain: a signal, else an exit code (the pid(s) form says neither).
    m = next((m for m in found if m[2]), None) or next((m for m in found if m[3]), found[0])
    pids = m[1].strip()
    if m[2]:
        sig = _SIGNAL_NAMES.get(m[2])
        how = (
            f"killed by signal {int(sig)} ({_SIGNAL_HINTS.get(sig, sig.name)})" if sig else f"killed by signal: {m[2]}"
        )
    elif m[3]:
        how = f"exited with code {m[3]}"
    else:
        how = "exited unexpectedly"
    who = f"data loader workers (pids {pids}) died" if "," in pids else f"a data loader worker (pid {pids}) died"
    return UserError(
        f"{who}: {how}; the last checkpoint is intact, rerun the same command to resume "
        "(perhaps with fewer data.num_workers)"
    )


class TrainLoader:
    """This rank's batches of steps `start_step`, `start_step + 1`, ... (masks per sample; pass
    each through `collate_batch`). A context manager: leaving it stops the worker processes,
    also when an error ends training, and says how often each repeated data warning came
    (`warnings`, the run's; each is said when first seen). A worker that dies (the OOM killer)
    ends the run with a UserError, whether the training process learns it in `__next__` or,
    from torch's SIGCHLD handler, anywhere inside the `with` block."""

    def __init__(self, loader: DataLoader, readers: int, signals: _WorkerSignals):
        self._signals, self._readers = signals, readers
        self.warnings = RunWarnings()
        self._closed = False
        self._parts = iter(loader)
        # A run that ends by an error never reaches __exit__ if the error came from elsewhere.
        atexit.register(signals.stop)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        try:
            # DataLoader takes one item from each worker in turn, so one step's parts arrive together.
            parts = [next(self._parts) for _ in range(self._readers)]
        except RuntimeError as e:
            if (died := worker_death(e)) is None:
                raise
            raise died from e
        for part in parts:
            self.warnings.say(part["warnings"])
        for part in parts:
            if _USER_ERROR in part:
                raise UserError(part[_USER_ERROR])
        batch = join_parts(parts)
        del batch["warnings"]  # said
        return batch

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._signals.stop()
        atexit.unregister(self._signals.stop)
        # What the iterator's __del__ does; called here so that workers stop now, not whenever
        # the last reference (a traceback's frame, say) goes.
        shutdown = getattr(self._parts, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.warnings.summary()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close()
        if (died := worker_death(error)) is not None and not isinstance(error, UserError):
            raise died from error


def make_train_loader(
    cfg: Config, shard_set: ShardSet, start_step: int = 0, rank: int = 0, world_size: int = 1
) -> TrainLoader:
    """This rank's share of the batches of steps `start_step`, `start_step + 1`, ..."""
    plan = StreamPlan.of(cfg, rank, world_size)
    workers = cfg.data.num_workers
    signals = _WorkerSignals()
    loader = DataLoader(
        TrainParts(cfg, shard_set, plan, start_step),
        batch_size=None,
        num_workers=workers,
        collate_fn=_unchanged,
        worker_init_fn=signals,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
    return TrainLoader(loader, plan.readers, signals)


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
