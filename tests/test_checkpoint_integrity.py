"""Checkpoint integrity: meta.json lists the size and sha256 of every file; a start, a probe and
an export verify what they read and fall back past a damaged checkpoint to an intact one."""

import hashlib
import json
import shutil

import pytest

from usjepa import rundir
from usjepa.errors import UserError
from usjepa.export import export_encoder
from usjepa.train.loop import train

STEPS = ("train.total_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=3")


@pytest.fixture(scope="module")
def template(shards, tmp_path_factory):
    """A trained 6-step tiny run with checkpoints at steps 2, 4 and 6, trained once per module."""
    from conftest import TINY

    from usjepa.config import load_config

    run = tmp_path_factory.mktemp("integrity") / "run"
    train(
        load_config(
            "configs/demo.yaml", [*TINY, f"data.shards={shards}", f"run.dir={run}", "teacher.checkpoint=none", *STEPS]
        )
    )
    return run


@pytest.fixture
def run(template, tmp_path):
    """A copy of the template run, free to damage."""
    return shutil.copytree(template, tmp_path / "copy")


def step_dir(run, step):
    return run / "checkpoints" / f"step_{step:06d}"


def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def tree(run):
    """Everything under checkpoints/, with contents: to show that a call wrote nothing."""
    root = run / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def val_losses(run, steps):
    return {s: rundir.read_meta(step_dir(run, s))["val_loss"] for s in steps}


def test_meta_lists_every_file_with_its_size_and_sha256(run):
    for path in rundir.list_checkpoints(run):
        files = rundir.read_meta(path)["files"]
        on_disk = {p.name: p for p in path.iterdir() if p.name != "meta.json"}
        assert set(files) == set(on_disk) and {".metadata", "__0_0.distcp"} <= set(files)
        for name, p in on_disk.items():
            assert files[name] == {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        assert rundir.checkpoint_problem(path) is None
        assert not list(path.glob(".*.tmp"))  # the atomic write left nothing behind


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda d: truncate(d / "__0_0.distcp"), "__0_0.distcp is 100 bytes, meta.json says"),
        (lambda d: flip_byte(d / "__0_0.distcp"), "__0_0.distcp does not match its sha256"),
        (lambda d: flip_byte(d / ".metadata"), ".metadata does not match its sha256"),
        (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
        (lambda d: truncate(d / "meta.json"), "meta.json is not valid JSON"),
        (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
    ],
    ids=["truncated-distcp", "flipped-byte", "flipped-metadata", "missing-file", "truncated-meta", "missing-meta"],
)
def test_checkpoint_problem_names_each_damage(run, damage, problem):
    path = step_dir(run, 6)
    damage(path)
    found = rundir.checkpoint_problem(path)
    assert found is not None and found.startswith(problem), found
    assert rundir.checkpoint_problem(step_dir(run, 4)) is None


def test_checkpoints_without_integrity_data_count_as_intact_when_their_meta_parses(run):
    path = step_dir(run, 6)
    meta = rundir.read_meta(path)
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))
    flip_byte(path / "__0_0.distcp")  # undetectable without the list: the old behaviour
    assert rundir.checkpoint_problem(path) is None


def test_a_start_resumes_from_the_newest_intact_checkpoint_and_repairs_the_pointers(run, capsys):
    root = run / "checkpoints"
    truncate(step_dir(run, 6) / "__0_0.distcp")
    (root / "best").write_text("step_000006")  # make the damaged one `best` too
    before = tree(run)
    # the other ranks (repair=False) choose the same and write nothing
    assert rundir.resume_checkpoint(run, repair=False) == step_dir(run, 4)
    assert tree(run) == before and capsys.readouterr().err == ""

    assert rundir.resume_checkpoint(run, repair=True) == step_dir(run, 4)
    err = capsys.readouterr().err
    assert err == (
        f"usjepa: checkpoint {step_dir(run, 6)} is damaged (__0_0.distcp is 100 bytes, meta.json says "
        f"{rundir.read_meta(root / 'damaged' / 'step_000006')['files']['__0_0.distcp']['size']}); "
        "moved to checkpoints/damaged/step_000006, resuming from step_000004\n"
    )
    assert not step_dir(run, 6).exists() and (root / "damaged" / "step_000006" / "meta.json").is_file()
    assert (root / "latest").read_text() == "step_000004"
    losses = val_losses(run, (2, 4))
    assert (root / "best").read_text() == f"step_{min(losses, key=losses.get):06d}"
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step_000002", "step_000004"]

    # a second start changes nothing
    after = tree(run)
    assert rundir.resume_checkpoint(run, repair=True) == step_dir(run, 4)
    assert tree(run) == after and capsys.readouterr().err == ""


def test_repair_keeps_earlier_damaged_ones_apart_and_drops_a_best_with_no_intact_replacement(run, capsys):
    root = run / "checkpoints"
    (root / "damaged" / "step_000006").mkdir(parents=True)  # left by an earlier repair
    (step_dir(run, 6) / "meta.json").unlink()
    for step in (2, 4):  # nothing was validated
        meta = rundir.read_meta(step_dir(run, step))
        del meta["val_loss"]
        (step_dir(run, step) / "meta.json").write_text(json.dumps(meta))
    (root / "best").write_text("step_000006")
    assert rundir.resume_checkpoint(run, repair=True) == step_dir(run, 4)
    assert "moved to checkpoints/damaged/step_000006.2, resuming from step_000004" in capsys.readouterr().err
    assert (root / "damaged" / "step_000006.2").is_dir() and not (root / "best").exists()


def test_a_latest_naming_a_missing_checkpoint_is_repaired(run, capsys):
    root = run / "checkpoints"
    shutil.rmtree(step_dir(run, 6))
    assert rundir.resume_checkpoint(run, repair=True) == step_dir(run, 4)
    assert (
        capsys.readouterr().err
        == f"usjepa: {root / 'latest'} names step_000006, which is missing; resuming from step_000004\n"
    )
    assert (root / "latest").read_text() == "step_000004"


def test_a_latest_set_back_by_hand_is_respected(run):
    (run / "checkpoints" / "latest").write_text("step_000004")
    truncate(step_dir(run, 6) / "meta.json")  # later than `latest`: not this start's business
    assert rundir.resume_checkpoint(run, repair=True) == step_dir(run, 4)
    assert step_dir(run, 6).is_dir()


def test_a_fresh_run_has_nothing_to_resume(tmp_path):
    assert rundir.resume_checkpoint(tmp_path / "new", repair=True) is None


def test_no_intact_checkpoint_is_an_error_that_moves_nothing(run):
    for step in (2, 4, 6):
        flip_byte(step_dir(run, step) / "__0_0.distcp")
    before = tree(run)
    with pytest.raises(UserError) as info:
        rundir.resume_checkpoint(run, repair=True)
    message = str(info.value)
    assert "no intact checkpoint" in message and "to start from scratch" in message and "\n" not in message
    assert all(f"step_00000{s} (__0_0.distcp does not match its sha256" in message for s in (2, 4, 6))
    assert tree(run) == before
    with pytest.raises(UserError, match="no intact checkpoint"):
        rundir.find_checkpoint(run, "latest")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_000006")
    with pytest.raises(UserError, match="names step_000006, which is missing, and there is no other checkpoint"):
        rundir.resume_checkpoint(run, repair=True)


def test_probe_and_export_read_the_newest_intact_checkpoint_and_move_nothing(run, tmp_path, capsys):
    flip_byte(step_dir(run, 6) / "__0_0.distcp")
    before = tree(run)
    assert rundir.find_checkpoint(run, "latest") == step_dir(run, 4)
    assert capsys.readouterr().err == (
        f"usjepa: checkpoint {step_dir(run, 6)} is damaged (__0_0.distcp does not match its sha256 in meta.json); "
        "using step_000004, the newest intact one\n"
    )
    out = export_encoder(run, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["usjepa"]["checkpoint"] == "step_000004"
    assert "step_000006 is damaged" in capsys.readouterr().err
    with pytest.raises(UserError) as info:
        export_encoder(run, tmp_path / "explicit", checkpoint="step_6")
    assert str(info.value) == (
        f"{run}: checkpoint step_000006 is damaged (__0_0.distcp does not match its sha256 in meta.json); "
        "choose latest, best or another step"
    )
    assert tree(run) == before  # read-only: the next training start moves it


def test_a_damaged_best_falls_back_to_the_best_intact_one(run, capsys):
    (run / "checkpoints" / "best").write_text("step_000006")
    truncate(step_dir(run, 6) / "meta.json")
    losses = val_losses(run, (2, 4))
    best = step_dir(run, min(losses, key=losses.get))
    assert rundir.find_checkpoint(run, "best") == best
    err = capsys.readouterr().err
    assert f"checkpoint {step_dir(run, 6)} is damaged (meta.json is not valid JSON" in err
    assert err.endswith(f"using {best.name}, the best intact one\n") and err.count("\n") == 1


# DCP raises CheckpointException, a BaseException, on the damaged file: hence no `raises=`.
def test_training_resumes_from_the_intact_checkpoint_with_the_same_losses(tiny_config, tmp_path, capsys):
    reference = train(tiny_config(*STEPS, f"run.dir={tmp_path / 'reference'}"))
    run = tmp_path / "run"
    first = train(tiny_config(*STEPS))
    assert first.loss == reference.loss
    truncate(step_dir(run, 6) / "__0_0.distcp")
    capsys.readouterr()
    again = train(tiny_config(*STEPS))
    assert "moved to checkpoints/damaged/step_000006, resuming from step_000004" in capsys.readouterr().err
    assert again.step == 6 and again.loss == reference.loss  # steps 5 and 6 redone bit-identically
    assert (run / "checkpoints" / "latest").read_text() == "step_000006"
    assert rundir.checkpoint_problem(step_dir(run, 6)) is None
