"""The `usjepa` command as a user runs it: real subprocesses, real files."""

import json
import subprocess
import sys

import pytest
import yaml

USJEPA = [sys.executable, "-m", "usjepa"]


def run(*args, timeout=600):
    return subprocess.run([*USJEPA, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_stage(capsys):
    out = run("--help")
    assert out.returncode == 0
    for command in ("demo", "synth", "shards", "train", "probe", "export"):
        assert command in out.stdout
    from usjepa.cli import main

    for command in (["demo"], ["synth"], ["train"], ["probe"], ["export"], ["shards", "build"], ["shards", "verify"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        assert exit_.value.code == 0
        assert "usage: usjepa " + " ".join(command) in capsys.readouterr().out


def test_console_script_is_the_module():
    import shutil

    script = shutil.which("usjepa")
    assert script, "pip install -e . puts `usjepa` on PATH"
    assert subprocess.run([script, "--version"], capture_output=True, text=True).stdout == run("--version").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "configs/demo.yaml", "optim.lrr=1"], "did you mean 'optim.lr'?"),
        (["train", "configs/nope.yaml"], "config file 'configs/nope.yaml' not found"),
        (["train", "configs/demo.yaml", "data.shards=/nonexistent/shards"], "/nonexistent/shards"),
        (["shards", "build", "/nonexistent/images", "/tmp/never"], "/nonexistent/images"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, message, tmp_path):
    if args[0] == "train":
        args = [*args, f"run.dir={tmp_path / 'run'}"]
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_bad_option_value_is_argparses_usage_and_one_error_line():
    out = run("train", "configs/demo.yaml", "--requeue-on-stop", "-1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == (
        "usjepa train: error: argument --requeue-on-stop: '-1' must be a whole number >= 0"
    )


def test_synth_shards_verify(tmp_path):
    images, shards = tmp_path / "images", tmp_path / "shards"
    assert run("synth", str(images), "--n", "40", "--size", "64").returncode == 0
    built = run(
        "shards",
        "build",
        str(images),
        str(shards),
        "--size",
        "32",
        "--shard-size",
        "10",
        "--group-pattern",
        r"^(patient\d+)_",
        "--no-progress",
    )
    assert built.returncode == 0, built.stderr
    verified = run("shards", "verify", str(shards))
    assert verified.returncode == 0, verified.stderr
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sum(s["count"] for s in manifest["splits"].values()) == 40


@pytest.mark.slow
def test_shortened_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # an override reaches both stages (the demo configs' predictor is 2 deep)
    args = ("demo", "--out", str(out), "--images", "160", "--steps", "12", "--seeds", "2", "predictor.depth=1")
    done = run(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("teacher", "student"):
        resolved = yaml.safe_load((out / "runs" / stage / "resolved_config.yaml").read_text())
        assert resolved["predictor"]["depth"] == 1, stage
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["backbones"]) == {"random", "teacher", "student"}
    assert summary["minutes"] > 0
    for result in summary["backbones"].values():
        assert len(result["per_seed"]) == 2
        assert 0.0 <= result["macro_f1_mean"] <= 1.0
    for kind in ("random", "teacher", "student"):
        assert (out / "probe" / f"{kind}.json").is_file()
        assert (out / "probe" / f"{kind}_confusion.png").is_file()
    assert "macro-F1" in done.stdout and "tensorboard --logdir" in done.stdout
    assert list((out / "runs" / "student" / "tb").glob("events.out.tfevents.*"))
    # rerunning a finished demo resumes every stage instead of redoing it
    again = run(*args)
    assert again.returncode == 0 and "nothing to do" in again.stderr
