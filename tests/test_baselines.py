"""Non-learned probe backbones (pixels, histogram) and `usjepa probe` with them end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from usjepa.cli import main
from usjepa.config import Config, DataConfig, ProbeConfig
from usjepa.data.augment import to_model_input
from usjepa.errors import UserError
from usjepa.eval.baselines import Histogram, Pixels, build_baseline
from usjepa.eval.features import extract_features
from usjepa.train.loop import train


def test_pixels_is_adaptive_average_pooling_of_the_model_input():
    images = torch.randn(3, 1, 32, 32)
    for size in (16, 5):  # 5 does not divide 32: adaptive pooling's uneven windows
        out = Pixels(size)(images)
        assert out.shape == (3, 1, size * size)
        assert torch.equal(out, F.adaptive_avg_pool2d(images, size).flatten(1).unsqueeze(1))
    features, _ = extract_features(Pixels(16), [(images, torch.tensor([0, 1, 2]))], "cpu")
    assert torch.equal(torch.from_numpy(features), F.adaptive_avg_pool2d(images, 16).flatten(1))


def test_histogram_counts_the_region_pixels_only():
    pixels = torch.zeros(2, 1, 4, 4)  # [0, 1] values; 0 = outside the region
    pixels[0, 0, 0] = torch.tensor([0.1, 0.1, 0.3, 0.55])
    pixels[0, 0, 1, :2] = torch.tensor([0.9, 1.0])  # 1.0 belongs to the last bin
    # sample 1 has no region pixel at all
    out = Histogram(4)(to_model_input(pixels))  # bins [0, .25) [.25, .5) [.5, .75) [.75, 1]

    assert out.shape == (2, 1, 4)
    assert torch.equal(out[0, 0], torch.tensor([2.0, 1.0, 1.0, 2.0]) / 6)  # 10 zeros not counted
    assert torch.equal(out[1, 0], torch.zeros(4))


def test_baselines_take_their_settings_from_the_run():
    cfg = Config(data=DataConfig(image_size=32), probe=ProbeConfig(pixels_size=8, histogram_bins=10))
    assert build_baseline("pixels", cfg).size == 8 and build_baseline("histogram", cfg).bins == 10
    cfg.probe.pixels_size = 33
    with pytest.raises(UserError, match="probe.pixels_size=33 is larger than the run's data.image_size=32"):
        build_baseline("pixels", cfg)


def test_probe_cli_with_baselines_and_random(tiny_config, tmp_path, capsys):
    train(tiny_config("train.total_steps=2", "checkpoint.every_steps=2"))
    run, reports = tmp_path / "run", tmp_path / "probe"
    assert (
        main(
            [
                "probe",
                str(run),
                "--backbone",
                "pixels,histogram,random",
                "--out",
                str(reports),
                "--device",
                "cpu",
                "probe.seeds=[0,1]",
                "probe.max_epochs=2",
                "probe.knn_k=3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out

    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backbone"))
    assert "val macro-F1 (%)" in lines[header] and "kNN macro-F1 (%)" in lines[header]
    rows = lines[header + 2 : header + 5]
    for row, (name, dim) in zip(rows, (("pixels", 16 * 16), ("histogram", 32), ("random", 32)), strict=True):
        report = json.loads((reports / f"{name}.json").read_text())
        assert report["backbone"] == name and report["num_features"] == dim
        assert set(report["knn"]) == {
            "macro_f1",
            "balanced_accuracy",
            "accuracy",
            "val_macro_f1",
            "val_balanced_accuracy",
            "k",
            "temperature",
        }
        assert (report["knn"]["k"], report["knn"]["temperature"]) == (3, 0.07)
        assert {"val_macro_f1_mean", "val_macro_f1_std", "macro_f1_mean", "macro_f1_std"} <= set(report)
        assert all({"val_macro_f1", "val_balanced_accuracy"} <= set(s) for s in report["per_seed"])
        # the row: name, three mean ± sd cells, the kNN macro-F1, the seeds
        assert row.split()[0] == name and row.split()[-2:] == [f"{100 * report['knn']['macro_f1']:.1f}", "2"]
