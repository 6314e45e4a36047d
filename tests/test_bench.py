"""`usjepa bench`: the spec, the feature cache, and the whole bench end to end (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from usjepa.bench.features import FeatureCache, SplitFeatures, extract_split, video_id, weights_sha256
from usjepa.bench.spec import load_bench
from usjepa.config import ConfigError
from usjepa.data.synth import GROUP_PATTERN, write_synthetic_dataset
from usjepa.ingest.build.run import build_shards
from usjepa.ingest.settings import BuildSettings
from usjepa.models.vit import Encoder
from usjepa.shardset.manifest import load_manifest


def _spec(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "out"),
                "datasets": {"a": "shards/a"},
                "backbones": {"r": {"kind": "random", "model": "vit_tiny_patch16_224"}},
                **fields,
            }
        )
    )
    return path


def test_the_shipped_ultrabench_spec_loads_with_the_eight_paper_datasets():
    spec = load_bench("configs/bench_ultrabench.yaml")
    assert list(spec.datasets) == ["aul", "busbra", "butterfly", "fatty_liver", "gbcu", "mmotu", "pocus", "tn5000"]
    assert spec.probe.seeds == (0, 1, 2, 3, 4)
    assert {b.kind for b in spec.backbones.values()} == {"run", "random", "open_clip", "mae", "beit", "timm"}


def test_spec_mistakes_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="backbnes.*backbones"):
        load_bench(_spec(tmp_path, backbnes={}))
    with pytest.raises(ConfigError, match="like: RUN_DIR.*model: TIMM_NAME"):
        load_bench(_spec(tmp_path, backbones={"r": {"kind": "random"}}))
    with pytest.raises(ConfigError, match="backbones.x.path: a timm backbone needs `path`"):
        load_bench(_spec(tmp_path, backbones={"x": {"kind": "timm", "model": "vit_tiny_patch16_224"}}))
    with pytest.raises(ConfigError, match="fewshot.fractions: 1.5"):
        load_bench(_spec(tmp_path), ["fewshot.fractions=[0.1,1.5]"])
    with pytest.raises(ConfigError, match="'noise' is not one of blur, contrast, speckle"):
        load_bench(_spec(tmp_path), ["robustness.kinds=[noise]"])
    assert load_bench(_spec(tmp_path), ["out=/tmp/b"]).out == "/tmp/b"


def test_weights_hash_follows_the_weights_not_the_module():
    a, b = (Encoder(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2) for _ in range(2))
    assert weights_sha256(a) != weights_sha256(b)
    b.load_state_dict(a.state_dict())
    assert weights_sha256(a) == weights_sha256(b)


def test_a_frame_belongs_to_its_video_and_an_image_to_its_group():
    assert video_id({"frame": 3, "source": "p1_a.mp4", "group": "p1"}) == "p1_a.mp4"
    assert video_id({"frame": None, "source": "x.png", "group": "vid7"}) == "vid7"
    assert video_id({"source": "x.png", "group": "g"}) == "g"


def test_the_cache_extracts_once_and_again_for_other_weights_or_data(shards, uneven_shards, tmp_path):
    encoder = Encoder(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2).eval()
    cache, calls = FeatureCache(tmp_path / "features"), []

    def get(manifest_dir: Path, module: torch.nn.Module) -> SplitFeatures:
        manifest = load_manifest(manifest_dir)
        fields = {"weights": weights_sha256(module), "dataset": str(manifest_dir), "split": "test"}
        return cache.get(
            fields,
            lambda: (
                calls.append(1)
                or extract_split(module, manifest, "test", 32, 8, torch.device("cpu"), torch.float32, progress=False)
            ),
        )

    first = get(shards, encoder)
    again = get(shards, encoder)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(first.features, again.features)
    np.testing.assert_array_equal(first.groups, again.groups)
    assert first.features.shape == (load_manifest(shards).count("test"), 16)
    get(uneven_shards, encoder)
    other = Encoder(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2).eval()
    get(shards, other)
    assert len(calls) == 3 and len(list((tmp_path / "features").glob("*.npz"))) == 3


def test_a_degraded_view_changes_the_features_of_the_same_images(shards):
    encoder = Encoder(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2).eval()
    manifest, cpu = load_manifest(shards), torch.device("cpu")
    clean = extract_split(encoder, manifest, "test", 32, 8, cpu, torch.float32, progress=False)
    blurred = extract_split(encoder, manifest, "test", 32, 8, cpu, torch.float32, ("blur", 2), progress=False)
    np.testing.assert_array_equal(clean.labels, blurred.labels)
    assert not np.allclose(clean.features, blurred.features)
    np.testing.assert_array_equal(
        blurred.features,
        extract_split(encoder, manifest, "test", 32, 8, cpu, torch.float32, ("blur", 2), progress=False).features,
    )


def _second_dataset(tmp_path: Path) -> Path:
    images = tmp_path / "synth2"
    write_synthetic_dataset(images, n=90, size=64, seed=7)
    build_shards(
        images,
        tmp_path / "shards2",
        BuildSettings(image_size=32, shard_size=30, group_pattern=GROUP_PATTERN),
        progress=False,
    )
    return tmp_path / "shards2"


def _bench(spec: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "usjepa", "bench", str(spec), "--no-progress", *overrides],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_a_bench_of_three_backbones_on_two_sets_writes_the_table_and_resumes(tiny_config, shards, tmp_path):
    from usjepa.train.loop import train

    train(tiny_config("train.total_steps=4", "checkpoint.every_steps=2"))
    run_dir = tmp_path / "run"
    timm_file = tmp_path / "vit.pth"
    with torch.random.fork_rng():
        torch.manual_seed(3)
        torch.save(
            timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).state_dict(),
            timm_file,
        )
    spec = tmp_path / "bench.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "out"),
                "image_size": 32,
                "batch_size": 16,
                "datasets": {"synth": str(shards), "synth2": str(_second_dataset(tmp_path))},
                "backbones": {
                    "student": {"kind": "run", "path": str(run_dir), "checkpoint": "latest"},
                    "random": {"kind": "random", "like": str(run_dir)},
                    "vit": {"kind": "timm", "path": str(timm_file), "model": "vit_tiny_patch16_224"},
                },
                "probe": {"seeds": [0, 1], "max_epochs": 20, "patience": 5},
                "fewshot": {"enabled": True, "fractions": [0.1, 1.0]},
                "robustness": {"enabled": True, "kinds": ["blur", "speckle"], "severities": [0, 2]},
            },
            sort_keys=False,
        )
    )
    done = _bench(spec)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["results"]) == ["student", "random", "vit"]
    for backbone in doc["results"].values():
        assert list(backbone) == ["synth", "synth2"]
        for cell in backbone.values():
            assert [r["seed"] for r in cell["linear"]["per_seed"]] == [0, 1]
            f1 = [r["macro_f1"] for r in cell["linear"]["per_seed"]]
            assert cell["linear"]["macro_f1_mean"] == pytest.approx(np.mean(f1))
            assert cell["linear"]["macro_f1_std"] == pytest.approx(np.std(f1))
            # the synthetic patients have images of several classes: groups, not videos
            assert set(cell) == {"linear", "knn", "fewshot", "robustness"}
            assert list(cell["fewshot"]) == ["0.1", "1.0"]
            assert cell["fewshot"]["1.0"]["per_seed"][0]["macro_f1"] == f1[0]
            assert cell["fewshot"]["0.1"]["per_seed"][0]["train_samples"] < cell["linear"]["counts"]["train"]
            assert list(cell["robustness"]) == ["blur", "speckle"]
            assert cell["robustness"]["blur"]["0"]["macro_f1_mean"] == cell["linear"]["macro_f1_mean"]
    prov = doc["provenance"]
    assert prov["backbones"]["vit"]["source_sha256"] == __import__("hashlib").sha256(timm_file.read_bytes()).hexdigest()
    assert prov["backbones"]["student"]["step"] == 4
    assert set(prov["datasets"]) == {"synth", "synth2"} and all(
        len(d["manifest_sha256"]) == 64 for d in prov["datasets"].values()
    )
    table = (out / "table.md").read_text()
    assert "student" in table and "synth2" in table
    assert (out / "table.csv").is_file() and list((out / "plots").glob("bar_*.png"))
    # 3 backbones x 2 sets x (3 splits + 2 degraded test views)
    features = sorted((out / "features").glob("*.npz"))
    assert len(features) == 3 * 2 * 5

    again = _bench(spec)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done before") == 6
    assert sorted((out / "features").glob("*.npz")) == features

    # One more seed: every cell is recomputed from cached features, nothing is extracted.
    more = _bench(spec, "probe.seeds=[0,1,2]")
    assert more.returncode == 0, more.stderr
    assert more.stdout.count("0 feature sets extracted") == 6
    doc = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in doc["results"]["vit"]["synth"]["linear"]["per_seed"]] == [0, 1, 2]
