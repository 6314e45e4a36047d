"""Shared fixtures: a small real shard set built with the project's own tools."""

from pathlib import Path

import pytest

from usjepa.config import load_config
from usjepa.data.synth import GROUP_PATTERN, write_synthetic_dataset
from usjepa.ingest.build.run import build_shards
from usjepa.ingest.settings import BuildSettings

# A model small enough that a training step takes milliseconds on one CPU core.
TINY = [
    "data.image_size=32",
    "model.patch_size=8",
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "predictor.depth=1",
    "predictor.embed_dim=16",
    "predictor.num_heads=2",
    "mask.min_keep=1",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "log.progress=false",
    "log.every_steps=1",
    "log.image_every_steps=2",
    "run.threads=1",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "images"
    write_synthetic_dataset(out, n=120, size=64, seed=0)
    return out


def _build(synth_dir: Path, out: Path, shard_size: int) -> Path:
    build_shards(
        synth_dir, out, BuildSettings(image_size=32, shard_size=shard_size, group_pattern=GROUP_PATTERN), progress=False
    )
    return out


@pytest.fixture(scope="session")
def shards(synth_dir, tmp_path_factory) -> Path:
    return _build(synth_dir, tmp_path_factory.mktemp("shards") / "demo", shard_size=12)


@pytest.fixture(scope="session")
def uneven_shards(synth_dir, tmp_path_factory) -> Path:
    """Shards of unequal sizes (the last of a split is short)."""
    return _build(synth_dir, tmp_path_factory.mktemp("shards") / "uneven", shard_size=10)


@pytest.fixture(scope="session")
def tiny_overrides(shards) -> list[str]:
    """TINY as command-line overrides, with the session's shards and a random teacher."""
    return [*TINY, f"data.shards={shards}", "teacher.checkpoint=none"]


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local two-node Slurm cluster (launch/dev_cluster.sh), up for the session."""
    from slurm_util import cluster_session

    yield from cluster_session()


@pytest.fixture
def tiny_config(shards, tmp_path):
    def make(*overrides: str):
        return load_config(
            "configs/demo.yaml",
            [*TINY, f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", "teacher.checkpoint=none", *overrides],
        )

    return make
