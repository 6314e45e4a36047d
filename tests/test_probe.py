"""Linear probe (docs/method.md#probe-protocol): feature extraction, training, metrics, reports."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score

from usjepa.config import ProbeConfig
from usjepa.errors import UserError
from usjepa.eval.features import extract_features
from usjepa.eval.knn import knn_probe
from usjepa.eval.probe import ProbeSplit, predict, run_probe, train_probe
from usjepa.eval.report import format_table, write_probe_report

CLASSES = ["benign", "malignant", "normal"]


def blobs(n_per_split: dict[str, int], dim=32, k=3, spread=1.0, seed=0) -> dict[str, ProbeSplit]:
    """Gaussian blobs sharing one set of class centres across splits; every split holds all
    classes. Features get an offset and scale so that standardisation matters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 2.0
    out = {}
    for name, n in n_per_split.items():
        y = np.arange(n) % k
        rng.shuffle(y)
        x = centres[y] + spread * rng.normal(size=(n, dim))
        out[name] = ProbeSplit(x * 4.0 + 7.0, y)
    return out


# ----------------------------------------------------------------------------- training


def test_separable_blobs_reach_high_macro_f1():
    splits = blobs({"train": 300, "val": 60, "test": 150})
    cfg = ProbeConfig(seeds=(0, 1, 2))
    r = run_probe(splits, CLASSES, cfg)

    assert r["macro_f1_mean"] > 0.95
    assert r["balanced_accuracy_mean"] > 0.95
    assert [s["seed"] for s in r["per_seed"]] == [0, 1, 2]
    for s in r["per_seed"]:
        assert 0.0 <= s["macro_f1"] <= 1.0 and 0.0 <= s["balanced_accuracy"] <= 1.0
        assert 1 <= s["best_epoch"] <= s["epochs"] <= cfg.max_epochs
    cm = np.array(r["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 150 * 3
    # rows are true classes: each row sums to that class's test count times the seeds
    per_class = np.bincount(splits["test"].labels, minlength=3)
    np.testing.assert_array_equal(cm.sum(axis=1), per_class * 3)
    assert r["class_names"] == CLASSES
    assert r["num_features"] == 32
    assert r["counts"] == {"train": 300, "val": 60, "test": 150}
    assert r["settings"] == {**dataclasses.asdict(cfg), "seeds": [0, 1, 2]}
    json.dumps(r, allow_nan=False)  # JSON-ready as returned


def test_val_scores_are_those_of_the_returned_seeds_probes():
    splits = blobs({"train": 90, "val": 45, "test": 45}, spread=4.0)
    cfg = ProbeConfig(seeds=(0, 1), max_epochs=10)
    r = run_probe(splits, CLASSES, cfg)
    val = splits["val"]
    for row in r["per_seed"]:
        model, _ = train_probe(splits["train"], val, 3, row["seed"], cfg)  # the same probe again
        pred = predict(model, val.features)
        assert row["val_macro_f1"] == f1_score(val.labels, pred, average="macro", labels=[0, 1, 2], zero_division=0)
        assert row["val_balanced_accuracy"] == balanced_accuracy_score(val.labels, pred)
    val_f1s = [row["val_macro_f1"] for row in r["per_seed"]]
    assert (r["val_macro_f1_mean"], r["val_macro_f1_std"]) == (np.mean(val_f1s), np.std(val_f1s))
    assert r["knn"] == knn_probe(splits, 3, cfg)  # every caller of run_probe gets the kNN probe too


def test_random_labels_stay_near_chance():
    rng = np.random.default_rng(1)
    splits = {
        name: ProbeSplit(rng.normal(size=(n, 32)), np.arange(n) % 3)
        for name, n in {"train": 300, "val": 90, "test": 300}.items()
    }
    r = run_probe(splits, CLASSES, ProbeConfig(seeds=(0, 1, 2)))
    assert abs(r["macro_f1_mean"] - 1 / 3) < 0.12
    assert abs(r["balanced_accuracy_mean"] - 1 / 3) < 0.12


def test_same_seed_same_result():
    splits = blobs({"train": 120, "val": 30, "test": 60}, spread=3.0)
    cfg = ProbeConfig(seeds=(0, 1), max_epochs=20)
    threads = torch.get_num_threads()
    a = run_probe(splits, CLASSES, cfg)
    b = run_probe(splits, CLASSES, cfg)
    assert a == b

    m1, h1 = train_probe(splits["train"], splits["val"], 3, seed=3, cfg=cfg, device="cpu")
    cpu = torch.device("cpu")
    m2, h2 = train_probe(splits["train"], splits["val"], 3, seed=3, cfg=cfg, device=cpu)
    m3, _ = train_probe(splits["train"], splits["val"], 3, seed=4, cfg=cfg, device="cpu")
    assert torch.equal(m1.weight, m2.weight) and torch.equal(m1.bias, m2.bias)
    assert h1 == h2
    assert not torch.equal(m1.weight, m3.weight)
    assert torch.get_num_threads() == threads  # the probe's single-thread switch is undone


def test_early_stopping_restores_best_epoch():
    # val labels are the opposite rule of train labels: val loss rises as the probe learns
    rng = np.random.default_rng(2)
    x_tr, x_va = rng.normal(size=(200, 8)) * 3 + 5, rng.normal(size=(60, 8)) * 3 + 5
    train = ProbeSplit(x_tr, (x_tr[:, 0] > 5).astype(int))
    val = ProbeSplit(x_va, (x_va[:, 0] <= 5).astype(int))
    cfg = ProbeConfig(patience=5)
    model, hist = train_probe(train, val, num_classes=2, seed=0, cfg=cfg, device="cpu")

    assert hist["stopped_early"]
    assert hist["epochs"] < cfg.max_epochs
    assert hist["epochs"] == hist["best_epoch"] + cfg.patience
    assert len(hist["val_loss"]) == len(hist["train_loss"]) == hist["epochs"]
    assert hist["best_val_loss"] == min(hist["val_loss"])
    assert hist["train_loss"][-1] < hist["train_loss"][0]

    # the returned module is one affine map on RAW features (standardisation folded in),
    # restored to the best epoch: its loss on raw val features is the best val loss
    assert isinstance(model, torch.nn.Linear) and not model.training
    with torch.no_grad():
        loss = F.cross_entropy(model(torch.tensor(val.features)), torch.tensor(val.labels))
    assert loss.item() == pytest.approx(hist["best_val_loss"], rel=1e-4)


# ----------------------------------------------------------------------------- features


class TinyEncoder(torch.nn.Module):
    """Conv patch embedding -> tokens [B, N, D] -> LayerNorm; dropout shows eval mode."""

    def __init__(self, dim: int = 16, patch: int = 4):
        super().__init__()
        self.proj = torch.nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.drop = torch.nn.Dropout(0.5)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
        return self.norm(self.drop(tokens))


def test_extract_features_keeps_order_and_mean_pools():
    torch.manual_seed(0)
    enc = TinyEncoder()
    enc.train()
    images = torch.randn(13, 1, 16, 16)
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0])
    batches = [(images[i : i + 5], labels[i : i + 5]) for i in range(0, 13, 5)]  # 5, 5, 3

    feats, labs = extract_features(enc, batches, torch.device("cpu"))

    assert feats.shape == (13, 16) and feats.dtype == np.float32
    assert labs.dtype == np.int64
    np.testing.assert_array_equal(labs, labels.numpy())
    assert enc.training  # previous mode restored
    enc.eval()
    with torch.no_grad():
        expected = enc(images).mean(dim=1).numpy()  # mean over the 16 tokens
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)

    # a DataLoader in fixed order gives the same; bf16 autocast returns float32 close to fp32
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4, shuffle=False)
    feats2, labs2 = extract_features(enc, loader, "cpu")
    np.testing.assert_allclose(feats2, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labs2, labs)
    feats_bf16, _ = extract_features(enc, loader, "cpu", dtype=torch.bfloat16)
    assert feats_bf16.dtype == np.float32
    np.testing.assert_allclose(feats_bf16, expected, atol=0.1)


def test_extract_features_rejects_pooled_output():
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))  # [B, D], not tokens
    with pytest.raises(UserError, match=r"expected tokens \[B, N, D\]"):
        extract_features(enc, [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))], "cpu")


# ----------------------------------------------------------------------------- reports


def test_write_probe_report_and_table(tmp_path):
    splits = blobs({"train": 60, "val": 30, "test": 30})
    r = run_probe(splits, CLASSES, ProbeConfig(seeds=(0, 1), max_epochs=5))
    out = tmp_path / "reports" / "aul"
    json_path, png_path = write_probe_report(r, out, "urfm")

    assert json_path == out / "urfm.json" and png_path == out / "urfm_confusion.png"
    assert json.loads(json_path.read_text()) == r
    with Image.open(png_path) as im:
        im.verify()
        assert im.format == "PNG"
    # no temp files left behind
    assert sorted(p.name for p in out.iterdir()) == ["urfm.json", "urfm_confusion.png"]

    # overwriting works (atomic replace)
    write_probe_report(r, out, "urfm")
    assert json.loads(json_path.read_text()) == r

    table = format_table({"urfm": r, "us-jepa": r})
    lines = table.splitlines()
    assert len(lines) == 4 and "macro-F1" in lines[0] and "seeds" in lines[0]
    assert lines[2].startswith("urfm") and lines[3].startswith("us-jepa")
    f1 = f"{100 * r['macro_f1_mean']:.1f} ± {100 * r['macro_f1_std']:.1f}"
    assert f1 in lines[2] and lines[2].rstrip().endswith("2")
    assert lines[0].split("  ")[-3:] == ["val macro-F1 (%)", "kNN macro-F1 (%)", "seeds"]
    val_f1 = f"{100 * r['val_macro_f1_mean']:.1f} ± {100 * r['val_macro_f1_std']:.1f}"
    assert lines[2].split()[-5:] == [*val_f1.split(), f"{100 * r['knn']['macro_f1']:.1f}", "2"]

    # results without the val and kNN scores (reports written before them) keep the old table
    old = {k: v for k, v in r.items() if k not in ("knn", "val_macro_f1_mean", "val_macro_f1_std")}
    lines = format_table({"urfm": old}).splitlines()
    assert lines[0].split() == ["backbone", "macro-F1", "(%)", "bal.", "acc", "(%)", "seeds"]
    # in a mix, a result without a column shows '-'
    lines = format_table({"urfm": r, "old": old}).splitlines()
    assert lines[3].split()[-5:] == ["±", f"{100 * r['balanced_accuracy_std']:.1f}", "-", "-", "2"]

    with pytest.raises(UserError):
        write_probe_report(r, out, "../escape")


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("empty", ["train", "val", "test"])
def test_empty_split_is_a_user_error(empty):
    splits = blobs({"train": 30, "val": 9, "test": 9})
    splits[empty] = ProbeSplit(np.zeros((0, 32)), np.zeros((0,), dtype=np.int64))
    with pytest.raises(UserError, match=f"the {empty} split is empty"):
        run_probe(splits, CLASSES, ProbeConfig(seeds=(0,), max_epochs=2))


def test_test_class_unseen_in_train_is_a_user_error():
    splits = blobs({"train": 30, "val": 9, "test": 9})
    keep = splits["train"].labels != 2
    splits["train"] = ProbeSplit(splits["train"].features[keep], splits["train"].labels[keep])
    with pytest.raises(UserError, match="never occur in train: 'normal' \\(2\\)"):
        run_probe(splits, CLASSES, ProbeConfig(seeds=(0,), max_epochs=2))


def test_other_user_errors():
    cfg = ProbeConfig(seeds=(0,), max_epochs=2)
    splits = blobs({"train": 30, "val": 9, "test": 9})
    with pytest.raises(UserError, match="missing: test"):
        run_probe({"train": splits["train"], "val": splits["val"]}, CLASSES, cfg)
    with pytest.raises(UserError, match="labels must be 0..1"):
        run_probe(splits, CLASSES[:2], cfg)
    bad = dict(splits, val=ProbeSplit(splits["val"].features[:, :5], splits["val"].labels))
    with pytest.raises(UserError, match="val split has 5 features"):
        run_probe(bad, CLASSES, cfg)
    with pytest.raises(UserError, match="seeds is empty"):
        run_probe(splits, CLASSES, dataclasses.replace(cfg, seeds=()))
    with pytest.raises(UserError, match="one label per feature row"):
        ProbeSplit(np.zeros((4, 3)), np.zeros(5, dtype=np.int64))
    with pytest.raises(UserError, match="must be integers"):
        ProbeSplit(np.zeros((2, 3)), np.array([0.5, 1.0]))


def test_class_absent_from_test_warns():
    splits = blobs({"train": 30, "val": 9, "test": 9})
    keep = splits["test"].labels != 1
    splits["test"] = ProbeSplit(splits["test"].features[keep], splits["test"].labels[keep])
    with pytest.warns(UserWarning, match="absent from the test split: \\['malignant'\\]"):
        r = run_probe(splits, CLASSES, ProbeConfig(seeds=(0,), max_epochs=2))
    assert r["macro_f1_mean"] <= 2 / 3 + 1e-9
