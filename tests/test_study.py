"""`usjepa study` end to end on a tiny synthetic corpus: every arm trained on 2 seeds, probed,
tabulated; an interrupted study resumes without redoing finished jobs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from usjepa.study.jobs import job_seconds

REPO = Path(__file__).resolve().parents[1]
# The tiny model of the other tests; the study itself sets the data, run dirs, seeds, threads.
ARCH = [o for o in TINY if o.startswith(("model.", "predictor.", "mask.", "data.batch_size", "optim.lr"))]


def write_spec(tmp_path: Path, synth_dir: Path) -> Path:
    recipe = tmp_path / "synth.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "synth",
                "format": "imagefolder",
                "source": "${SYNTH}",
                "options": {"group_pattern": r"^(patient\d+)_"},
                "build": {"image_size": 64, "shard_size": 20},
            }
        )
    )
    spec = {
        "out": str(tmp_path / "out"),
        "image_size": 32,
        "vars": {"SYNTH": str(synth_dir)},
        "shard_sets": {"synth": {"recipe": str(recipe)}},
        "corpus": ["synth"],
        "tasks": {"lesions": "synth"},
        "arms": {
            "mae_teacher": {"config": "configs/demo_teacher.yaml", "overrides": ARCH},
            "salt": {"config": "configs/demo.yaml", "teacher": "mae_teacher", "overrides": ARCH},
            "ema": {"config": "configs/demo.yaml", "overrides": [*ARCH, "train.objective=ema"], "probe": "target"},
            "random": {"probe": "random", "like": "salt"},
        },
        "baselines": ["pixels"],
        "seeds": [0, 1],
        "probe_seeds": [0, 1],
        "steps": 6,
        "jobs": 2,
        "compare": [["salt", "random"], ["salt", "ema"]],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study(spec: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "usjepa", "study", str(spec), "probe_seeds=[0,1]", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )


@pytest.mark.slow
def test_a_study_trains_probes_tabulates_and_resumes(synth_dir, tmp_path):
    spec = write_spec(tmp_path, synth_dir)
    out = tmp_path / "out"
    # Interrupted once the first training runs have started: the rerun continues them.
    first = study(spec)
    deadline = time.monotonic() + 300
    while not list((out / "runs").glob("*/seed*/checkpoints/latest")):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGINT)
    first.communicate(timeout=120)
    assert not (out / "results.json").exists()

    done = study(spec)
    stdout, stderr = done.communicate(timeout=900)
    assert done.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    results = summary["results"]
    assert set(results) == {"mae_teacher", "salt", "ema", "random", "pixels"}
    for name in ("mae_teacher", "salt", "ema", "random"):
        scores = results[name]["tasks"]["lesions"]
        assert scores["linear_macro_f1"]["n"] == 2 * 2  # pretraining seeds x probe seeds
        assert len(scores["linear_macro_f1_by_pretraining_seed"]) == 2
        assert scores["knn_macro_f1"]["n"] == 2
        assert 0 <= scores["linear_macro_f1"]["mean"] <= 100
    assert results["pixels"]["tasks"]["lesions"]["linear_macro_f1"]["n"] == 2
    # compute: SALT's own FLOPs plus its teacher's; random init spent none
    salt, teacher = results["salt"]["compute"], results["mae_teacher"]["compute"]
    assert salt["gflops"] > 0 and salt["gflops_with_teacher"] == pytest.approx(salt["gflops"] + teacher["gflops"])
    assert results["random"]["compute"]["gflops"] == 0
    assert salt["train_minutes"] > 0
    # the two seeds are different runs: different data order, masks and initial weights
    runs = [out / "runs" / "salt" / f"seed{s}" / "resolved_config.yaml" for s in (0, 1)]
    assert [yaml.safe_load(r.read_text())["run"]["seed"] for r in runs] == [0, 1]
    assert {c["task"] for c in summary["comparisons"]} == {"lesions"} and len(summary["comparisons"]) == 2
    table = (out / "table.md").read_text()
    assert "| salt |" in table and "kNN macro-F1" in table and "salt vs random on lesions" in table
    assert "linear probe macro-F1 (%)" in stdout
    # a finished study reruns as a report only: no job starts again
    runs_before = job_seconds(out)
    again = study(spec)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert job_seconds(out) == runs_before


def test_a_spec_mistake_is_one_line(synth_dir, tmp_path):
    spec = write_spec(tmp_path, synth_dir)
    bad = subprocess.run(
        [sys.executable, "-m", "usjepa", "study", str(spec), "arms.salt.teacher=nobody"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "usjepa study: error: arms.salt.teacher: 'nobody' is not a trained arm"
