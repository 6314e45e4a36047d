"""The training data stream: resumable at any batch, with real DataLoader workers."""

import io
import shutil
import tarfile

import pytest
import torch

from usjepa.data.pipeline import eval_batches, make_train_loader
from usjepa.errors import UserError
from usjepa.ingest.manifest import load_manifest


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("images", "regions", "labels", "context", "targets"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_started_at_batch_k_yields_batches_k_onwards(tiny_config, shards, workers):
    cfg = tiny_config(f"data.num_workers={workers}")
    manifest = load_manifest(shards)
    # more batches than one epoch of a stream, so epochs roll over inside the run
    full = take(make_train_loader(cfg, manifest), 14)
    assert [b["batch_index"] for b in full] == list(range(14))
    for start in (1, 5, 11):
        resumed = take(make_train_loader(cfg, manifest, start_batch=start), 14 - start)
        assert [b["batch_index"] for b in resumed] == list(range(start, 14))
        assert all(same(a, b) for a, b in zip(full[start:], resumed))


def test_batches_are_single_channel_with_region_and_masks(tiny_config, shards):
    cfg = tiny_config()
    batch = take(make_train_loader(cfg, load_manifest(shards)), 1)[0]
    assert batch["images"].shape == (8, 1, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["regions"].shape == (8, 1, 32, 32) and batch["regions"].dtype == torch.bool
    assert batch["context"].shape[0] == 8 and batch["targets"].shape[:2] == (4, 8)
    # outside the scan region the augmented image is black (-1 after normalisation)
    assert torch.all(batch["images"][~batch["regions"]] == -1)
    assert batch["labels"].min() >= 0


def test_region_conditioned_masks_stay_in_the_region(tiny_config, shards):
    cfg = tiny_config("mask.region_conditioned=true", "data.augment.crop_scale=[0.3,0.4]")
    for batch in take(make_train_loader(cfg, load_manifest(shards)), 3):
        valid = batch["regions"].reshape(8, 4, 8, 4, 8).any(2).any(3).reshape(8, 16)
        rows = torch.arange(8)[:, None]
        if valid.sum(1).min() >= cfg.mask.min_keep:
            assert valid[rows, batch["context"]].all()
            assert all(valid[rows, t].all() for t in batch["targets"])


def test_more_workers_than_shards_is_a_clear_error(tiny_config, shards):
    cfg = tiny_config("data.num_workers=64")
    with pytest.raises(UserError, match="64 workers need at least 64"):
        make_train_loader(cfg, load_manifest(shards))


def test_corrupt_samples_are_skipped_and_counted(tiny_config, shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    manifest = load_manifest(broken)
    first = manifest.shard_paths("train")[0]
    # rewrite one shard with garbage in place of every image
    members = []
    with tarfile.open(first) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            members.append((m, b"not a png" if m.name.endswith(".png") and "region" not in m.name else data))
    with tarfile.open(first, "w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    batches = take(make_train_loader(tiny_config(f"data.shards={broken}"), manifest), 12)
    assert sum(b["corrupt"] for b in batches) > 0
    assert all(b["images"].shape[0] == 8 - b["corrupt"] for b in batches)


def test_eval_batches_keep_shard_order(shards):
    manifest = load_manifest(shards)
    a = [y for _, y in eval_batches(manifest, "test", 32, 5)]
    b = [y for _, y in eval_batches(manifest, "test", 32, 7)]
    assert torch.equal(torch.cat(a), torch.cat(b))
    assert sum(len(y) for y in a) == manifest.count("test")


def test_short_side_shards_keep_their_aspect_and_feed_square_batches(synth_dir, tmp_path, tiny_config):
    from usjepa.ingest.sample_format import decode_sample
    from usjepa.ingest.verify import verify_shards
    from usjepa.ingest.writer import BuildSettings, build_shards
    import webdataset as wds

    out = tmp_path / "short"
    build_shards(synth_dir, out, BuildSettings(image_size=32, shard_size=12, resize_mode="short_side",
                                               group_pattern=r"^(patient\d+)_"), progress=False)
    verify_shards(out)
    manifest = load_manifest(out)
    shapes = {decode_sample(r)[0].shape for r in wds.tarfile_to_samples()([{"url": str(p)} for p in manifest.shard_paths("train")])}
    assert all(min(s) == 32 for s in shapes) and any(s[0] != s[1] for s in shapes)  # fans are wider than tall
    batch = take(make_train_loader(tiny_config(f"data.shards={out}"), manifest), 1)[0]
    assert batch["images"].shape == (8, 1, 32, 32)
    images, _ = next(eval_batches(manifest, "test", 32, 4))
    assert images.shape == (4, 1, 32, 32)
