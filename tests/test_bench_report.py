"""Bench tables and plots (usjepa.bench.report) and the paper's numbers (usjepa.bench.paper),
on a hand-made results.json: 3 backbones, a paper dataset (busbra) and one the paper lacks."""

from __future__ import annotations

import copy
import csv

import pytest
from PIL import Image

from usjepa.bench.paper import PAPER_DATASETS, PAPER_MACRO_F1, paper_dataset
from usjepa.bench.report import format_summary, write_plots, write_tables


def linear(mean: float, std: float, seeds: int = 5, confusion: bool = False) -> dict:
    r = {
        "macro_f1_mean": mean,
        "macro_f1_std": std,
        "per_seed": [
            {"seed": s, "macro_f1": mean, "balanced_accuracy": mean, "accuracy": mean, "val_macro_f1": mean}
            for s in range(seeds)
        ],
    }
    if confusion:
        r |= {"confusion_matrix": [[40, 10], [5, 45]], "class_names": ["benign", "malignant"]}
    return r


def knn(mean: float, k: int = 20) -> dict:
    return {"macro_f1_mean": mean, "macro_f1_std": 0.0, "per_seed": [{"seed": None, "macro_f1": mean}], "k": k}


def curve(means: dict[str, float]) -> dict:
    return {x: {"macro_f1_mean": m, "macro_f1_std": 0.02, "per_seed": []} for x, m in means.items()}


RESULTS = {
    "us_jepa": {
        "busbra": {
            "linear": linear(0.7234, 0.0123, confusion=True),
            "knn": knn(0.65),
            "fewshot": curve({"0.01": 0.40, "0.05": 0.55, "1.0": 0.72}),
        },
        "covid_blues": {
            "linear": linear(0.78, 0.01),
            "knn": knn(0.70),
            "video": {"linear": {"rule": "mean", "videos": 12, **linear(0.80, 0.03)}},
        },
    },
    "teacher": {
        "busbra": {"linear": linear(0.70, 0.02), "knn": knn(0.68)},  # kNN column: the second row wins
        "covid_blues": {
            "linear": linear(0.81, 0.015, confusion=True),
            "knn": knn(0.66),  # linear too
            "robustness": {
                kind: curve({s: 0.8 - 0.1 * int(s) for s in "0123"}) for kind in ("blur", "contrast", "speckle")
            },
        },
    },
    # interrupted: no kNN yet, no covid_blues at all; a name that must be sanitised in file names
    "random vit/b16": {"busbra": {"linear": linear(0.40, 0.05, confusion=True)}},
}


def md_table(md: str, heading: str) -> dict[str, list[str]]:
    """The md table under the line starting with `heading`: row label -> cells (header row as 'backbone')."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            label, *cells = [c.strip() for c in line.strip("|").split("|")]
            rows[label] = cells
    return rows


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> tuple[str, list[dict]]:
    md_path, csv_path = write_tables(RESULTS, tmp_path_factory.mktemp("bench"))
    assert (md_path.name, csv_path.name) == ("table.md", "table.csv")
    with csv_path.open(newline="") as f:
        return md_path.read_text(), list(csv.DictReader(f))


# ----------------------------------------------------------------------------- table.md


def test_linear_table_cells_best_and_missing(tables):
    t = md_table(tables[0], "**Linear probe**")
    assert t["backbone"] == ["busbra", "covid_blues"]
    assert list(t)[1:4] == ["us_jepa", "teacher", "random vit/b16"]
    assert t["us_jepa"] == ["**72.3 ± 1.2**", "78.0 ± 1.0"]
    assert t["teacher"] == ["70.0 ± 2.0", "**81.0 ± 1.5**"]
    assert t["random vit/b16"] == ["40.0 ± 5.0", "–"]
    assert sum(c.startswith("**") for row in t.values() for c in row) == 2  # one per column


def test_paper_rows_below_ours_unranked(tables):
    t = md_table(tables[0], "**Linear probe**")
    labels = list(t)
    assert labels[4:] == [f"paper: {m}" for m in PAPER_MACRO_F1]
    assert t["paper: US-JEPA"] == ["73.8", "–"]
    assert t["paper: USrc-JEPA"] == ["76.0", "–"]  # above every bench row, still not bold
    assert t["paper: DINOv3"] == ["70.9", "–"]
    assert not any("**" in c for label in labels[4:] for c in t[label])


def test_knn_table(tables):
    md = tables[0]
    assert "**kNN probe** (k = 20)" in md
    t = md_table(md, "**kNN probe**")
    assert t["us_jepa"] == ["65.0", "**70.0**"]
    assert t["teacher"] == ["**68.0**", "66.0"]
    assert t["random vit/b16"] == ["–", "–"]
    assert not any(label.startswith("paper:") for label in t)


def test_video_table_only_with_video_results(tables, tmp_path):
    t = md_table(tables[0], "**Video-level linear probe**")
    assert t["backbone"] == ["covid_blues"]  # only the datasets with videos
    assert t["us_jepa"] == ["**80.0 ± 3.0**"]
    assert t["teacher"] == ["–"]
    no_video = copy.deepcopy(RESULTS)
    del no_video["us_jepa"]["covid_blues"]["video"]
    md_path, _ = write_tables(no_video, tmp_path)
    md = md_path.read_text()
    assert "**Linear probe**" in md and "**kNN probe**" in md
    assert "Video-level" not in md


# ----------------------------------------------------------------------------- table.csv


def test_csv_matches_the_results(tables):
    rows = tables[1]
    assert list(rows[0]) == [
        "backbone",
        "source",
        "busbra_mean",
        "busbra_std",
        "covid_blues_mean",
        "covid_blues_std",
        "best_in",
    ]
    ours = {r["backbone"]: r for r in rows if r["source"] == "bench"}
    assert list(ours) == ["us_jepa", "teacher", "random vit/b16"]
    assert float(ours["us_jepa"]["busbra_mean"]) == 72.34
    assert float(ours["us_jepa"]["busbra_std"]) == 1.23
    assert float(ours["teacher"]["covid_blues_mean"]) == 81.0
    assert ours["random vit/b16"]["covid_blues_mean"] == ours["random vit/b16"]["covid_blues_std"] == ""
    assert [ours[b]["best_in"] for b in ours] == ["busbra", "covid_blues", ""]


def test_csv_paper_rows(tables):
    paper = {r["backbone"]: r for r in tables[1] if r["source"] == "paper"}
    assert list(paper) == list(PAPER_MACRO_F1)
    assert float(paper["US-JEPA"]["busbra_mean"]) == 73.8
    assert paper["US-JEPA"]["busbra_std"] == paper["US-JEPA"]["covid_blues_mean"] == ""
    assert all(r["best_in"] == "" for r in paper.values())


def test_no_paper_rows_without_a_paper_dataset(tmp_path):
    results = {"us_jepa": {"covid_blues": RESULTS["us_jepa"]["covid_blues"]}}
    md_path, csv_path = write_tables(results, tmp_path)
    assert "paper" not in md_path.read_text()
    with csv_path.open(newline="") as f:
        assert [r["source"] for r in csv.DictReader(f)] == ["bench"]


# ----------------------------------------------------------------------------- terminal


def test_summary_is_aligned_and_marks_the_best():
    title, header, rule, *rows = format_summary(RESULTS).splitlines()
    assert "linear probe" in title
    assert header.split() == ["backbone", "busbra", "covid_blues"]
    assert len({len(line) for line in (header, rule, *rows)}) == 1
    by_label = {r[: len("random vit/b16")].strip(): r for r in rows}
    assert "72.3 ± 1.2*" in by_label["us_jepa"] and "81.0 ± 1.5*" in by_label["teacher"]
    assert by_label["random vit/b16"].rstrip().endswith("–")
    assert "73.8" in by_label["paper: US-JEPA"] and "*" not in by_label["paper: US-JEPA"]
    assert sum(r.count("*") for r in rows) == 2


# ----------------------------------------------------------------------------- paper


@pytest.mark.parametrize(
    "name, expected",
    [
        ("busbra", "busbra"),
        ("BUS-BRA", "busbra"),
        ("Fatty-Liver", "fatty_liver"),
        ("fatty", "fatty_liver"),
        ("fatty liver", "fatty_liver"),
        ("FATTY_LIVER", "fatty_liver"),
        ("TN5000", "tn5000"),
        ("tn_5000", "tn5000"),
        ("POCUS", "pocus"),
        ("covid_blues", None),
        ("busi", None),
        ("", None),
    ],
)
def test_paper_dataset(name, expected):
    assert paper_dataset(name) == expected


def test_paper_numbers():
    assert PAPER_DATASETS == ("aul", "busbra", "butterfly", "fatty_liver", "gbcu", "mmotu", "pocus", "tn5000")
    assert all(tuple(scores) == PAPER_DATASETS for scores in PAPER_MACRO_F1.values())
    assert PAPER_MACRO_F1["USrc-JEPA"]["fatty_liver"] == 89.2
    assert PAPER_MACRO_F1["URFM (teacher)"]["tn5000"] == 77.4


# ----------------------------------------------------------------------------- plots


def test_plots_for_the_protocols_present(tmp_path):
    written = write_plots(RESULTS, tmp_path)
    expected = {
        "bar_busbra.png",
        "bar_covid_blues.png",
        "fewshot_busbra.png",
        "robustness_covid_blues.png",
        "confusion_us_jepa_busbra.png",
        "confusion_teacher_covid_blues.png",
        "confusion_random_vit_b16_busbra.png",
    }
    assert {p.name for p in written} == expected
    # nothing else, not the scratch folder of the confusion plots
    assert {p.name for p in (tmp_path / "plots").iterdir()} == expected
    for path in written:
        assert path.parent == tmp_path / "plots"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 0 and im.height > 0
            im.verify()


def test_no_plots_without_results(tmp_path):
    only_knn = {"us_jepa": {"busbra": {"knn": knn(0.6)}}}
    assert write_plots(only_knn, tmp_path) == []
    assert list((tmp_path / "plots").iterdir()) == []
