"""Which shards each logical data stream reads, and which streams each rank and worker owns.

The global batch of every step is made of one equal chunk from each of `data.streams`
logical streams. Stream s reads, in epoch e, either its share `order[s::S]` of a permutation
of the shards seeded by (seed, e) (every shard once per epoch), or in resampled mode (a
weighted mixture of shard sets) a draw with replacement seeded by (seed, e, s). Ranks own
contiguous runs of streams and loader workers split a rank's run again, so a stream is always
read by exactly one process. Nothing here depends on the world size or the worker count
except who reads what: the data of step k is the same for 1 rank or 64.

Streams are endless: each keeps its own epoch count, so shards of uneven size never make one
rank run dry before another (every rank yields a batch at every step; nothing can hang).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usjepa.config import Config
from usjepa.errors import UserError
from usjepa.shardset.manifest import Manifest, ShardInfo, load_manifest


@dataclass(frozen=True)
class StreamPlan:
    streams: int
    batch_size: int  # global
    rank: int
    world_size: int
    workers: int  # loader processes per rank (0 = read in the training process)

    @property
    def chunk(self) -> int:
        """Samples each stream gives to every step."""
        return self.batch_size // self.streams

    @property
    def readers(self) -> int:
        """Processes reading this rank's streams."""
        return max(self.workers, 1)

    def rank_streams(self) -> range:
        per_rank = self.streams // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def worker_streams(self, worker: int) -> range:
        mine = self.rank_streams()
        per_worker = len(mine) // self.readers
        return mine[worker * per_worker : (worker + 1) * per_worker]

    @staticmethod
    def of(cfg: Config, rank: int = 0, world_size: int = 1) -> StreamPlan:
        """The plan for `rank`, or a UserError saying which setting to change."""
        d = cfg.data
        plan = StreamPlan(d.streams, d.batch_size, rank, world_size, d.num_workers)
        if d.streams % world_size:
            raise UserError(
                f"data.streams={d.streams} cannot be split over {world_size} ranks: set data.streams to a "
                f"multiple of {world_size} (it fixes the data order of a run, so pick a multiple of every "
                "world size you plan to use, e.g. 64) and data.batch_size to a multiple of it"
            )
        per_rank = d.streams // world_size
        if per_rank % plan.readers:
            fits = [n for n in range(1, per_rank + 1) if per_rank % n == 0]
            raise UserError(
                f"each of the {world_size} ranks reads {per_rank} of data.streams={d.streams}, which "
                f"data.num_workers={d.num_workers} does not divide: use data.num_workers in {fits} "
                f"or raise data.streams to a multiple of {world_size * d.num_workers}"
            )
        return plan


@dataclass(frozen=True)
class ShardSet:
    """The training shards of one run: one shard set, or a weighted mixture of several."""

    manifests: tuple[Manifest, ...]
    paths: tuple[str, ...]
    counts: tuple[int, ...]
    probs: np.ndarray | None  # per-shard draw probabilities (resampled mode), None: each once per epoch
    sha256s: tuple[str, ...] = ()  # what the manifest recorded, checked when a loader opens the shard

    @property
    def resampled(self) -> bool:
        return self.probs is not None

    @staticmethod
    def load(cfg: Config) -> ShardSet:
        split = cfg.data.split
        manifests, paths, counts, probs = [], [], [], []
        entries = cfg.data.shard_sets
        weights = []
        for entry in entries:
            manifest = load_manifest(entry.shards)
            if split not in manifest.splits or not manifest.count(split):
                raise UserError(
                    f"{manifest.root}: no samples in split '{split}' (it has "
                    f"{', '.join(f'{k}: {v.count}' for k, v in manifest.splits.items()) or 'none'}); "
                    "set data.split or rebuild the shards"
                )
            manifests.append(manifest)
            # docs/method.md#mixture-weights: a set's default weight is min(train samples, 50,000), the
            # manifest's sampling_weight.
            weights.append(entry.weight or manifest.sampling_weight or manifest.count(split))
        total_weight = sum(weights)
        sha256s = []
        for manifest, weight in zip(manifests, weights):
            shards = _usable_shards(manifest, split, cfg.data.on_bad_shard)
            shard_counts = [info.count for _, info in shards]
            paths += [str(path) for path, _ in shards]
            counts += shard_counts
            sha256s += [info.sha256 for _, info in shards]
            # Every shard of a set equally likely, scaled so that the set's expected share of the
            # samples (draws x shard sizes) is its weight: p = weight / samples in the set.
            probs += [weight / total_weight / sum(shard_counts)] * len(shard_counts)
        resampled = bool(cfg.data.mixture)
        shard_set = ShardSet(
            tuple(manifests),
            tuple(paths),
            tuple(counts),
            np.asarray(probs) / sum(probs) if resampled else None,
            tuple(sha256s),
        )
        if not resampled and len(paths) < cfg.data.streams:
            raise UserError(
                f"{manifests[0].root}: split '{split}' has {len(paths)} shards but data.streams="
                f"{cfg.data.streams} (at least ranks x data.num_workers) needs at least {cfg.data.streams}, "
                "one per stream: lower data.streams (and data.num_workers) or rebuild with a smaller "
                "--shard-size"
            )
        return shard_set

    def epoch_shards(self, seed: int, epoch: int, stream: int, streams: int) -> list[int]:
        """Indices of the shards `stream` reads in `epoch`, in reading order."""
        if self.probs is None:
            order = np.random.default_rng([seed, epoch]).permutation(len(self.paths))
            return [int(i) for i in order[stream::streams]]
        draws = max(1, round(len(self.paths) / streams))
        rng = np.random.default_rng([seed, epoch, stream, 0x4E5A])
        return [int(i) for i in rng.choice(len(self.paths), size=draws, p=self.probs)]


def shard_problem(path: Path) -> str | None:
    """Why shard file `path` cannot be read (cheap: no checksum), or None."""
    if not path.is_file():
        return "missing"
    if not os.access(path, os.R_OK):
        return "not readable"
    size = path.stat().st_size
    # A tar is whole 512-byte blocks; anything else was cut short (a copy, a full disk).
    if size == 0 or size % 512:
        return f"truncated ({size} bytes)"
    return None


def _usable_shards(manifest: Manifest, split: str, on_bad_shard: str) -> list[tuple[Path, ShardInfo]]:
    """The split's shards with their manifest entries; bad ones stop the run, or with
    data.on_bad_shard=skip are left out with one line."""
    shards = list(zip(manifest.shard_paths(split), manifest.splits[split].shards))
    bad = [(path, problem) for path, _ in shards if (problem := shard_problem(path))]
    if not bad:
        return shards
    listed = ", ".join(f"{path.name} ({problem})" for path, problem in bad[:3]) + (", ..." if len(bad) > 3 else "")
    if on_bad_shard == "error" or len(bad) == len(shards):
        # Skipping helps only where something is left to train on.
        skip = ", or set data.on_bad_shard=skip to train without them" if len(bad) < len(shards) else ""
        raise UserError(
            f"{manifest.root}: {len(bad)} of the {len(shards)} '{split}' shards the manifest lists cannot be read: "
            f"{listed}; restore them (usjepa shards verify {manifest.root} checks a set){skip}"
        )
    print(f"usjepa: {manifest.root}: skipping {len(bad)} of {len(shards)} '{split}' shards: {listed}", file=sys.stderr)
    dropped = {path for path, _ in bad}
    return [(path, info) for path, info in shards if path not in dropped]
