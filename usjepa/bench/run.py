"""Run a bench: every backbone on every dataset, with the linear and kNN probes and, when
enabled, few-shot and robustness; results.json after each (backbone, dataset) cell.

A cell is recomputed only when what it depends on changed (backbone weights, shard set,
protocol settings), so an interrupted bench reruns from the first unfinished cell, and its
features come from the cache (features.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from usjepa import __version__
from usjepa.bench.backbones import Backbone, load_bench_backbone
from usjepa.bench.features import FeatureCache, SplitFeatures, extract_split
from usjepa.bench.protocols import fewshot_indices, has_videos, video_level
from usjepa.bench.report import write_plots, write_tables
from usjepa.bench.spec import BenchSpec
from usjepa.errors import UserError
from usjepa.eval.metrics import scores
from usjepa.eval.probe import SPLITS, class_probabilities, predict, run_probe, train_probe
from usjepa.fileio import atomic_write_text, files_sha256, make_folder
from usjepa.rundir import resolve_device
from usjepa.shardset.manifest import Manifest, load_manifest
from usjepa.train.provenance import code_state

RESULTS = "results.json"


@dataclass
class Dataset:
    name: str
    manifest: Manifest
    sha256: str  # of manifest.json, which lists every shard's sha256

    def provenance(self) -> dict:
        m = self.manifest
        return {
            "shards": str(m.root),
            "manifest_sha256": self.sha256,
            "class_names": list(m.classes),
            "counts": {s: m.count(s) for s in SPLITS if s in m.splits},
        }


def load_datasets(spec: BenchSpec) -> dict[str, Dataset]:
    found = {}
    for name, folder in spec.datasets.items():
        try:
            manifest = load_manifest(folder)
        except UserError as e:
            raise UserError(f"datasets.{name}: {e}") from None
        missing = [s for s in SPLITS if s not in manifest.splits or not manifest.count(s)]
        if missing:
            raise UserError(
                f"datasets.{name}={folder}: no {'/'.join(missing)} samples; the bench needs labelled "
                "train, val and test splits (build the set with a recipe from shards/)"
            )
        found[name] = Dataset(name, manifest, files_sha256([Path(manifest.root) / "manifest.json"]))
    return found


def _summary(per_seed: list[dict], **extra) -> dict:
    f1 = np.array([r["macro_f1"] for r in per_seed])
    return {"macro_f1_mean": float(f1.mean()), "macro_f1_std": float(f1.std(ddof=0)), "per_seed": per_seed, **extra}


class Cell:
    """One backbone on one dataset: features of the three splits, the probes on them."""

    def __init__(
        self,
        spec: BenchSpec,
        backbone: Backbone,
        dataset: Dataset,
        cache: FeatureCache,
        device: torch.device,
        progress: bool,
    ):
        self.spec, self.backbone, self.dataset, self.cache = spec, backbone, dataset, cache
        self.device, self.progress = device, progress
        self.classes = list(dataset.manifest.classes)
        self.models: dict[int, torch.nn.Linear] = {}

    def features(self, split: str, view: tuple[str, int] | None = None) -> SplitFeatures:
        b, d = self.backbone, self.dataset
        fields = {**b.cache_fields(), "dataset": d.sha256, "split": split, "view": view, "dtype": self.spec.dtype}
        dtype = torch.bfloat16 if self.spec.dtype == "bf16" else torch.float32
        desc = f"{b.name} {d.name} {split}" + (f" {view[0]} {view[1]}" if view else "")
        return self.cache.get(
            fields,
            lambda: extract_split(
                b.module,
                d.manifest,
                split,
                b.image_size,
                self.spec.batch_size,
                self.device,
                dtype,
                view,
                desc,
                self.progress,
            ),
        )

    def evaluate(self) -> dict:
        splits = {s: self.features(s) for s in SPLITS}
        probe = run_probe(
            {s: f.probe_split() for s, f in splits.items()},
            self.classes,
            self.spec.probe,
            self.device,
            on_model=self.models.__setitem__,
        )
        knn = probe.pop("knn")
        keep = ("seed", "macro_f1", "balanced_accuracy", "accuracy", "val_macro_f1")
        result = {
            "linear": _summary(
                [{k: r[k] for k in keep} for r in probe["per_seed"]],
                val_macro_f1_mean=probe["val_macro_f1_mean"],
                confusion_matrix=probe["confusion_matrix"],
                class_names=self.classes,
                counts=probe["counts"],
                num_features=probe["num_features"],
            ),
            "knn": _summary(
                [{"seed": None, "macro_f1": knn["macro_f1"]}],
                k=knn["k"],
                temperature=knn["temperature"],
                val_macro_f1=knn["val_macro_f1"],
            ),
        }
        test = splits["test"]
        if has_videos(test.videos, test.labels):
            result["video"] = {"linear": self._video(test)}
        if self.spec.fewshot.enabled:
            result["fewshot"] = self._fewshot(splits, result["linear"])
        if self.spec.robustness.enabled:
            result["robustness"] = self._robustness(result["linear"])
        return result

    def _video(self, test: SplitFeatures) -> dict:
        rule, per_seed = self.spec.video_rule, []
        for seed, model in self.models.items():
            frame_scores = (
                class_probabilities(model, test.features, self.device)
                if rule == "mean"
                else predict(model, test.features, self.device)
            )
            videos, truth, pred = video_level(test.labels, frame_scores, test.videos, rule)
            per_seed.append({"seed": seed, **scores(truth, pred, len(self.classes))})
        return _summary(per_seed, rule=rule, videos=len(videos))

    def _fewshot(self, splits: dict[str, SplitFeatures], full: dict) -> dict:
        train, val, test = splits["train"], splits["val"].probe_split(), splits["test"]
        out = {}
        for fraction in self.spec.fewshot.fractions:
            if fraction == 1.0:  # all the labels: the linear probe itself
                out["1.0"] = _summary(
                    [
                        {"seed": r["seed"], "macro_f1": r["macro_f1"], "train_samples": len(train.labels)}
                        for r in full["per_seed"]
                    ]
                )
                continue
            per_seed = []
            for seed in self.spec.probe.seeds:
                rows = fewshot_indices(train.labels, train.groups, fraction, seed)
                model, _ = train_probe(
                    train.probe_split(rows), val, len(self.classes), seed, self.spec.probe, self.device
                )
                pred = predict(model, test.features, self.device)
                per_seed.append(
                    {
                        "seed": int(seed),
                        "macro_f1": scores(test.labels, pred, len(self.classes))["macro_f1"],
                        "train_samples": int(len(rows)),
                    }
                )
            out[str(fraction)] = _summary(per_seed)
        return out

    def _robustness(self, clean: dict) -> dict:
        """The probes trained on clean train features, scored on degraded test images."""
        out: dict[str, dict] = {}
        for kind in self.spec.robustness.kinds:
            out[kind] = {}
            for severity in self.spec.robustness.severities:
                if severity == 0:
                    out[kind]["0"] = _summary(
                        [{"seed": r["seed"], "macro_f1": r["macro_f1"]} for r in clean["per_seed"]]
                    )
                    continue
                test = self.features("test", (kind, severity))
                out[kind][str(severity)] = _summary(
                    [
                        {
                            "seed": seed,
                            "macro_f1": scores(test.labels, predict(m, test.features, self.device), len(self.classes))[
                                "macro_f1"
                            ],
                        }
                        for seed, m in self.models.items()
                    ]
                )
        return out


def protocol_settings(spec: BenchSpec) -> dict:
    return {
        "probe": dataclasses.asdict(spec.probe),
        "fewshot": dataclasses.asdict(spec.fewshot),
        "robustness": dataclasses.asdict(spec.robustness),
        "video_rule": spec.video_rule,
        "dtype": spec.dtype,
    }


def _cell_key(backbone: Backbone, dataset: Dataset, settings: dict) -> str:
    text = json.dumps(
        {"backbone": backbone.cache_fields(), "dataset": dataset.sha256, "settings": settings}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _previous(path: Path) -> dict:
    if not path.is_file():
        return {"results": {}, "provenance": {"cells": {}}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: unreadable ({e}); move it away to rerun the bench from its feature cache") from None


def run_bench(spec: BenchSpec, progress: bool = True, log=print) -> dict:
    """Run (or resume) the bench of `spec`; returns the results.json document."""
    out = Path(spec.out)
    make_folder(out, "the bench folder", "choose another folder for out")
    device = resolve_device(spec.device)
    datasets = load_datasets(spec)
    cache = FeatureCache(out / "features")
    settings = protocol_settings(spec)
    doc = _previous(out / RESULTS)
    results, cells = doc["results"], doc["provenance"].setdefault("cells", {})
    provenance = {
        "backbones": {},  # every backbone of the spec is loaded (and hashed) below
        "datasets": {n: d.provenance() for n, d in datasets.items()},
        "protocol_settings": settings,
        "code": code_state(out),
        "usjepa_version": __version__,
        "cells": cells,
    }
    doc = {"results": results, "provenance": provenance}
    for name, bspec in spec.backbones.items():
        backbone = load_bench_backbone(name, bspec, spec, device)
        provenance["backbones"][name] = {**backbone.provenance, "weights_sha256": backbone.weights_sha256}
        for dname, dataset in datasets.items():
            key = _cell_key(backbone, dataset, settings)
            if cells.get(name, {}).get(dname) == key and dname in results.get(name, {}):
                log(f"bench: {name} on {dname}: done before (results kept)")
                continue
            start, misses = time.perf_counter(), cache.misses
            cell = Cell(spec, backbone, dataset, cache, device, progress).evaluate()
            results.setdefault(name, {})[dname] = cell
            cells.setdefault(name, {})[dname] = key
            atomic_write_text(out / RESULTS, json.dumps(doc, indent=1, allow_nan=False) + "\n")
            lin, knn = cell["linear"], cell["knn"]
            log(
                f"bench: {name} on {dname}: linear macro-F1 {100 * lin['macro_f1_mean']:.1f} ± "
                f"{100 * lin['macro_f1_std']:.1f}, kNN {100 * knn['macro_f1_mean']:.1f} "
                f"({cache.misses - misses} feature sets extracted, {time.perf_counter() - start:.0f} s)"
            )
        del backbone  # its weights go before the next backbone loads
    # Only the spec's backbones and datasets are reported, whatever an earlier spec left.
    doc["results"] = {b: {d: results[b][d] for d in spec.datasets if d in results.get(b, {})} for b in spec.backbones}
    atomic_write_text(out / RESULTS, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    write_tables(doc["results"], out)
    if spec.plots:
        write_plots(doc["results"], out)
    return doc
