"""`usjepa export`: a trained run's encoder as timm weights, loaded back by timm, the probe
and the teacher loader. Real runs, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import timm
import torch
from fs_util import read_only
from safetensors.torch import load_file

from usjepa.cli import main
from usjepa.config import dump_yaml, load_config
from usjepa.errors import UserError
from usjepa.eval.backbones import load_backbone
from usjepa.export import export_encoder
from usjepa.models.teacher import load_teacher
from usjepa.rundir import make_run_dir, write_resolved_config
from usjepa.train.loop import train

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tiny_config, tmp_path):
    """A 4-step tiny run with checkpoints at steps 2 and 4."""
    train(tiny_config("train.total_steps=4", "checkpoint.every_steps=2"))
    return tmp_path / "run"


def gray_images() -> torch.Tensor:
    x = torch.full((2, 1, 32, 32), 0.2)
    x[1, :, 8:24, 8:24] = -0.6  # a bright-dark square: not every token alike
    return x


def student_tokens(run_dir, checkpoint="latest") -> torch.Tensor:
    encoder, _ = load_backbone("student", run_dir, CPU, checkpoint=checkpoint)
    with torch.no_grad():
        return encoder(gray_images())


def test_export_rebuilds_in_timm_with_the_encoders_output(run, tmp_path):
    out = export_encoder(run, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    info = config["usjepa"]
    assert (info["step"], info["checkpoint"], info["objective"]) == (4, "step_000004", "salt")
    assert info["run_dir"] == str(run.resolve()) and info["teacher"]["source"] == "none"
    assert (
        config["model_args"] | {"in_chans": 1, "class_token": False, "global_pool": "", "num_classes": 0}
        == config["model_args"]
    )
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32]
    assert (config["pretrained_cfg"]["mean"], config["pretrained_cfg"]["std"]) == ([0.5], [0.5])

    weights = load_file(out / "encoder.safetensors")
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in weights.values())
    assert not any(k.startswith(("encoder.", "predictor.", "model.")) for k in weights)
    with safetensors.safe_open(out / "encoder.safetensors", "pt") as f:
        meta = f.metadata()
    assert (meta["format"], meta["step"], meta["checkpoint"]) == ("pt", "4", "step_000004")
    assert meta["run_dir"] == str(run.resolve())

    torch.testing.assert_close(timm_tokens(out), student_tokens(run), atol=1e-5, rtol=0)

    # an older checkpoint by name, and `best`
    older = export_encoder(run, tmp_path / "step2", checkpoint="step_2")
    assert json.loads((older / "config.json").read_text())["usjepa"]["checkpoint"] == "step_000002"
    best = export_encoder(run, tmp_path / "best", checkpoint="best")
    assert (
        json.loads((best / "config.json").read_text())["usjepa"]["checkpoint"]
        == (run / "checkpoints" / "best").read_text()
    )


def timm_tokens(out: Path) -> torch.Tensor:
    config = json.loads((out / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    model.load_state_dict(load_file(out / "encoder.safetensors"), strict=True)
    with torch.no_grad():
        return model.forward_features(gray_images())


def test_cli_prints_the_files_and_a_timm_snippet(run, tmp_path):
    out = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "-m", "usjepa", "export", str(run), str(out)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "exported step_000004 (step 4, salt)" in done.stdout
    assert str(out / "encoder.safetensors") in done.stdout and "timm.create_model(" in done.stdout
    # the snippet it prints runs as printed
    snippet = "\n".join(
        line.strip()
        for line in done.stdout.splitlines()
        if line.startswith("  ") and ("import" in line or "model =" in line)
    )
    scope: dict = {}
    exec(snippet, scope)
    assert isinstance(scope["model"], timm.models.vision_transformer.VisionTransformer)


def test_mistakes_are_one_line_errors(run, tmp_path, capsys):
    with pytest.raises(UserError, match="not a run dir"):
        export_encoder(tmp_path / "missing", tmp_path / "a")
    with pytest.raises(UserError, match="one of step_000002, step_000004"):
        export_encoder(run, tmp_path / "a", checkpoint="step_3")
    with pytest.raises(UserError, match="one of step_000002"):
        export_encoder(run, tmp_path / "a", checkpoint="newest")

    fresh = load_config(run / "resolved_config.yaml", [f"run.dir={tmp_path / 'fresh'}"])
    make_run_dir(Path(fresh.run.dir))
    write_resolved_config(fresh)
    with pytest.raises(UserError, match="no checkpoint yet; train it first"):
        export_encoder(tmp_path / "fresh", tmp_path / "a")

    # an earlier export is replaced; a folder with other files needs --force and keeps them
    out = tmp_path / "export"
    assert main(["export", str(run), str(out), "--checkpoint", "step_2"]) == 0
    assert main(["export", str(run), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["usjepa"]["step"] == 4
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt" in err and "--force" in err
    assert main(["export", str(run), str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_an_export_folder_that_cannot_be_made_or_written_is_one_line(run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(run), str(tmp_path / "afile" / "exp")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"usjepa export: error: cannot create the export folder {tmp_path / 'afile' / 'exp'} "
        f"({tmp_path / 'afile'} is a file, not a folder); choose a folder you can write to for OUT\n"
    )
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        assert main(["export", str(run), str(locked)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"usjepa export: error: cannot write the export to {locked} (Read-only file system); free disk space "
        "or choose a folder you can write to for OUT\n"
    )
    assert list(locked.iterdir()) == []


def test_probe_and_teacher_load_the_export(run, tmp_path, capsys):
    out = export_encoder(run, tmp_path / "enc")
    expected = student_tokens(run)

    encoder, _ = load_backbone(str(out), run, CPU)
    with torch.no_grad():
        torch.testing.assert_close(encoder(gray_images()), expected, atol=1e-5, rtol=0)

    reports = tmp_path / "probe"
    assert (
        main(
            [
                "probe",
                str(run),
                "--backbone",
                f"student,{out}",
                "--out",
                str(reports),
                "--device",
                "cpu",
                "probe.seeds=[0]",
                "probe.max_epochs=2",
            ]
        )
        == 0
    )
    assert "enc " in capsys.readouterr().out  # a table row named after the export folder
    report = json.loads((reports / "enc.json").read_text())
    assert report["backbone"] == "enc" and report["export"] == str(out.resolve())
    student = json.loads((reports / "student.json").read_text())
    assert report["macro_f1_mean"] == student["macro_f1_mean"]  # same weights, same probe

    # The teacher loader reads timm state dicts; the head count (not in the weights, and not
    # timm's 64 per head here) comes from the export's metadata.
    cfg = load_config(
        run / "resolved_config.yaml", [f"teacher.checkpoint={out / 'encoder.safetensors'}", "teacher.dtype=fp32"]
    )
    teacher, info = load_teacher(cfg, CPU)
    assert info.source == str((out / "encoder.safetensors").resolve()) and len(info.sha256) == 64
    with torch.no_grad():
        torch.testing.assert_close(teacher(gray_images()), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_run_saved_sharded_by_two_ranks_exports_whole(tiny_config, tmp_path):
    cfg = tiny_config("data.streams=2", "train.total_steps=2")
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "usjepa",
            "train",
            str(tmp_path / "config.yaml"),
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = Path(cfg.run.dir)
    assert len(list((run_dir / "checkpoints" / "step_000002").glob("*.distcp"))) == 2  # one file per rank
    out = export_encoder(run_dir, tmp_path / "export")
    torch.testing.assert_close(timm_tokens(out), student_tokens(run_dir), atol=1e-5, rtol=0)
