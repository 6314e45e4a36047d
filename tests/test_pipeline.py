"""The training data stream: resumable at any step, the same global batch on any world size."""

import io
import shutil
import tarfile

import numpy as np
import pytest
import torch

from usjepa.data.pipeline import collate_batch, eval_batches, make_train_loader
from usjepa.data.streams import ShardSet, StreamPlan
from usjepa.errors import UserError
from usjepa.shardset.manifest import load_manifest


def take(cfg, n, start=0, rank=0, world=1):
    """n collated batches of `rank` from step `start`."""
    it = make_train_loader(cfg, ShardSet.load(cfg), start, rank, world)
    return [collate_batch(next(it)) for _ in range(n)]


def same(a, b):
    return a["ids"] == b["ids"] and all(
        torch.equal(a[k], b[k]) for k in ("images", "regions", "labels", "context", "targets")
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_started_at_step_k_yields_steps_k_onwards(tiny_config, workers):
    cfg = tiny_config(f"data.num_workers={workers}", "data.streams=2")
    # more steps than one epoch of a stream, so epochs roll over inside the run
    full = take(cfg, 14)
    assert [b["step"] for b in full] == list(range(14))
    for start in (1, 5, 11):
        resumed = take(cfg, 14 - start, start)
        assert [b["step"] for b in resumed] == list(range(start, 14))
        assert all(same(a, b) for a, b in zip(full[start:], resumed))


def test_the_global_batch_is_the_same_for_any_ranks_and_workers(tiny_config):
    one = take(tiny_config("data.streams=4", "data.num_workers=0"), 6)
    workers = take(tiny_config("data.streams=4", "data.num_workers=2"), 6)
    ranks = [take(tiny_config("data.streams=4", "data.num_workers=1"), 6, rank=r, world=2) for r in range(2)]
    for step in range(6):
        assert same(one[step], workers[step])
        assert ranks[0][step]["ids"] == [0, 1, 2, 3] and ranks[1][step]["ids"] == [4, 5, 6, 7]
        for key in ("images", "labels"):
            assert torch.equal(one[step][key], torch.cat([r[step][key] for r in ranks]))


def test_stream_plan_splits_streams_by_rank_then_worker(tiny_config):
    plan = StreamPlan.of(tiny_config("data.streams=8", "data.num_workers=2"), rank=1, world_size=2)
    assert plan.chunk == 1 and list(plan.rank_streams()) == [4, 5, 6, 7]
    assert [list(plan.worker_streams(w)) for w in range(2)] == [[4, 5], [6, 7]]
    with pytest.raises(UserError, match="cannot be split over 3 ranks"):
        StreamPlan.of(tiny_config("data.streams=8"), rank=0, world_size=3)
    with pytest.raises(UserError, match=r"data.num_workers=3 does not divide: use data.num_workers in \[1, 2, 4\]"):
        StreamPlan.of(tiny_config("data.streams=8", "data.num_workers=3"), rank=0, world_size=2)


def test_batches_are_single_channel_with_region_and_masks(tiny_config):
    batch = take(tiny_config(), 1)[0]
    assert batch["images"].shape == (8, 1, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["regions"].shape == (8, 1, 32, 32) and batch["regions"].dtype == torch.bool
    assert batch["context"].shape[0] == 8 and batch["targets"].shape[:2] == (4, 8)
    # outside the scan region the augmented image is black (-1 after normalisation)
    assert torch.all(batch["images"][~batch["regions"]] == -1)
    assert batch["labels"].min() >= 0


def test_region_conditioned_masks_stay_in_the_region(tiny_config):
    cfg = tiny_config("mask.region_conditioned=true", "data.augment.crop_scale=[0.3,0.4]")
    for batch in take(cfg, 3):
        valid = batch["regions"].reshape(8, 4, 8, 4, 8).any(2).any(3).reshape(8, 16)
        rows = torch.arange(8)[:, None]
        if valid.sum(1).min() >= cfg.mask.min_keep:
            assert valid[rows, batch["context"]].all()
            assert all(valid[rows, t].all() for t in batch["targets"])


def test_fewer_shards_than_streams_is_a_clear_error(tiny_config, shards):
    n = len(load_manifest(shards).shard_paths("train"))
    with pytest.raises(UserError, match=f"has {n} shards but data.streams=8 .* needs at least 8"):
        ShardSet.load(tiny_config("data.streams=8"))


def test_uneven_shards_never_run_a_stream_dry(tiny_config, uneven_shards):
    counts = [s.count for s in load_manifest(uneven_shards).splits["train"].shards]
    assert len(set(counts)) > 1
    cfg = tiny_config("data.streams=4", f"data.shards={uneven_shards}")
    # 40 steps of 2 samples per stream: several epochs of every stream, each a different length
    batches = [take(cfg, 40, rank=r, world=2) for r in range(2)]
    assert all(len(b) == 40 and all(x["images"].shape[0] == 4 for x in b) for b in batches)


def _corrupt_first_train_shard(shards, out):
    shutil.copytree(shards, out)
    first = load_manifest(out).shard_paths("train")[0]
    members = []
    with tarfile.open(first) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            members.append((m, b"not a png" if m.name.endswith(".png") and "region" not in m.name else data))
    with tarfile.open(first, "w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return out


def test_corrupt_samples_are_skipped_and_counted(tiny_config, shards, tmp_path):
    broken = _corrupt_first_train_shard(shards, tmp_path / "broken")
    with pytest.raises(UserError, match=r"train-000000\.tar: sha256 differs from the manifest; .*on_bad_shard=skip"):
        take(tiny_config(f"data.shards={broken}"), 12)
    batches = take(tiny_config(f"data.shards={broken}", "data.on_bad_shard=skip"), 12)
    assert sum(b["corrupt"] for b in batches) > 0
    assert all(b["images"].shape[0] == 8 - b["corrupt"] for b in batches)


def test_a_mixture_gives_each_set_its_weight_in_samples(tiny_config, shards, uneven_shards):
    # Sets with shards of different sizes: the shares are of samples, not of shard draws.
    cfg = tiny_config(
        "data.shards=",
        f"data.mixture=[{{shards: {shards}, weight: 1}}, {{shards: {uneven_shards}, weight: 3}}]",
        "data.streams=2",
    )
    shard_set = ShardSet.load(cfg)
    assert shard_set.resampled
    drawn = [i for epoch in range(1000) for s in range(2) for i in shard_set.epoch_shards(0, epoch, s, 2)]
    samples = np.array([shard_set.counts[i] for i in drawn])
    from_uneven = np.array([shard_set.paths[i].startswith(str(uneven_shards)) for i in drawn])
    assert 0.72 < samples[from_uneven].sum() / samples.sum() < 0.78
    assert len(take(cfg, 3)) == 3
    # no weight: each set's manifest sampling_weight (its train size here) sets its share
    default = ShardSet.load(
        tiny_config("data.shards=", f"data.mixture=[{{shards: {shards}}}, {{shards: {uneven_shards}}}]")
    )
    expected = [
        sum(p * c for p, c, path in zip(default.probs, default.counts, default.paths) if path.startswith(str(root)))
        for root in (shards, uneven_shards)
    ]
    weights = [load_manifest(root).sampling_weight for root in (shards, uneven_shards)]
    assert expected[0] / expected[1] == pytest.approx(weights[0] / weights[1])
    with pytest.raises(UserError, match="not both"):
        tiny_config(f"data.mixture=[{{shards: {uneven_shards}}}]")


def test_eval_batches_keep_shard_order(shards):
    manifest = load_manifest(shards)
    a = [y for _, y in eval_batches(manifest, "test", 32, 5)]
    b = [y for _, y in eval_batches(manifest, "test", 32, 7)]
    assert torch.equal(torch.cat(a), torch.cat(b))
    assert sum(len(y) for y in a) == manifest.count("test")


def test_short_side_shards_keep_their_aspect_and_feed_square_batches(synth_dir, tmp_path, tiny_config):
    import webdataset as wds

    from usjepa.ingest.build.run import build_shards
    from usjepa.ingest.settings import BuildSettings
    from usjepa.ingest.verify import verify_shards
    from usjepa.shardset.sample import decode_sample

    out = tmp_path / "short"
    build_shards(
        synth_dir,
        out,
        BuildSettings(image_size=32, shard_size=12, resize_mode="short_side", group_pattern=r"^(patient\d+)_"),
        progress=False,
    )
    verify_shards(out)
    manifest = load_manifest(out)
    shapes = {
        decode_sample(r)[0].shape
        for r in wds.tarfile_to_samples()([{"url": str(p)} for p in manifest.shard_paths("train")])
    }
    assert all(min(s) == 32 for s in shapes) and any(s[0] != s[1] for s in shapes)  # fans are wider than tall
    batch = take(tiny_config(f"data.shards={out}"), 1)[0]
    assert batch["images"].shape == (8, 1, 32, 32)
    images, _ = next(eval_batches(manifest, "test", 32, 4))
    assert images.shape == (4, 1, 32, 32)


def test_a_shard_with_fewer_records_than_its_manifest_says_is_reported(tiny_config, shards, tmp_path, capfd):
    short = tmp_path / "short"
    shutil.copytree(shards, short)
    first = load_manifest(short).shard_paths("train")[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    dropped = members[0][0].name.split(".")[0]  # one sample: all files of its key
    with tarfile.open(first, "w") as tar:
        for m, data in members:
            if m.name.split(".")[0] != dropped:
                tar.addfile(m, io.BytesIO(data))
    with pytest.raises(UserError, match=f"{first.name}: sha256 differs from the manifest"):
        take(tiny_config(f"data.shards={short}"), 12)
    capfd.readouterr()
    take(tiny_config(f"data.shards={short}", "data.on_bad_shard=skip"), 12)  # more than one epoch of the stream
    err = capfd.readouterr().err
    assert err.count("a resumed run will not see exactly the same data") == 1  # said once, not every epoch
    assert err.count(f"{first.name}: sha256 differs from the manifest: read") == 1


@pytest.mark.parametrize("on_bad_shard", ["error", "skip"])
def test_skipping_is_advised_only_where_it_would_help(tiny_config, shards, tmp_path, on_bad_shard):
    holed = tmp_path / "holed"
    shutil.copytree(shards, holed)
    paths = load_manifest(holed).shard_paths("train")
    paths[0].unlink()
    if on_bad_shard == "error":  # one of several missing: skipping trains on the others
        with pytest.raises(UserError, match=r"\(missing\); restore them .* or set data.on_bad_shard=skip to train"):
            ShardSet.load(tiny_config(f"data.shards={holed}"))
    for path in paths[1:]:
        path.unlink()
    with pytest.raises(UserError, match=f"{len(paths)} of the {len(paths)} 'train' shards") as caught:
        ShardSet.load(tiny_config(f"data.shards={holed}", f"data.on_bad_shard={on_bad_shard}"))
    assert str(caught.value).endswith(f"restore them (usjepa shards verify {holed} checks a set)")


def test_a_dead_loader_worker_is_one_line_wherever_torch_raises_it(tiny_config):
    # torch's SIGCHLD handler raises in the training process wherever it is, not only in next()
    cfg = tiny_config()
    with pytest.raises(UserError) as caught, make_train_loader(cfg, ShardSet.load(cfg)) as loader:
        next(loader)
        raise RuntimeError("DataLoader worker (pid 4321) is killed by signal: Killed. ")
    assert str(caught.value) == (
        "a data loader worker (pid 4321) died: killed by signal 9 (out of memory?); the last checkpoint is intact, "
        "rerun the same command to resume (perhaps with fewer data.num_workers)"
    )
    with pytest.raises(RuntimeError, match="^DataLoader worker"), make_train_loader(cfg, ShardSet.load(cfg)):
        raise RuntimeError("DataLoader worker pool misconfigured")  # not a worker's death: left alone
