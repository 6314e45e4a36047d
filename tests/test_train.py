"""Training loop: resume equality, checkpoints, TensorBoard, non-finite handling."""

import json
import math
from dataclasses import replace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from usjepa import rundir
from usjepa.errors import UserError
from usjepa.train.loop import train


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_resume_continues_exactly_where_it_stopped(tiny_config, tmp_path):
    full = tiny_config("train.total_steps=6", "checkpoint.every_steps=3", f"run.dir={tmp_path / 'full'}")
    train(full)
    split = tiny_config(
        "train.total_steps=6", "checkpoint.every_steps=3", f"run.dir={tmp_path / 'split'}", "run.stop_at_step=3"
    )
    first = train(split)
    assert first.step == 3
    resumed = train(tiny_config("train.total_steps=6", "checkpoint.every_steps=3", f"run.dir={tmp_path / 'split'}"))
    assert resumed.step == 6
    a, b = scalars(tmp_path / "full", "train/loss"), scalars(tmp_path / "split", "train/loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s] == b[s] for s in a), (a, b)  # bit-identical: same data, masks, RNG, optimizer state


def test_checkpoints_keep_the_last_k_and_never_hold_the_teacher(tiny_config, tmp_path):
    cfg = tiny_config("train.total_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=2")
    train(cfg)
    run = tmp_path / "run"
    names = [p.name for p in rundir.list_checkpoints(run)]
    assert names == ["step_000006", "step_000008"]
    assert (run / "checkpoints" / "latest").read_text() == "step_000008"
    meta = json.loads((run / "checkpoints" / "step_000008" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["data_position"] == 8 and meta["samples_seen"] == 64
    assert meta["teacher"]["source"] == "none"
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(run / "checkpoints" / "step_000008")).read_metadata().state_dict_metadata
    assert any(k.startswith("model.encoder.") for k in keys)
    assert any(k.startswith("model.predictor.") for k in keys)
    assert not any("teacher" in k for k in keys)
    assert (run / "resolved_config.yaml").is_file()
    # a finished run reruns as a no-op
    assert train(cfg).step == 8


def test_tensorboard_has_what_a_user_watches(tiny_config, tmp_path):
    train(tiny_config("train.total_steps=4", "checkpoint.every_steps=4"))
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in [
        "train/loss",
        "train/lr",
        "train/weight_decay",
        "train/grad_norm",
        "perf/images_per_s",
        "perf/step_time_s",
        "health/feature_std",
    ]:
        assert tag in tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[0] < lrs[1]  # warm-up
    assert "masks/context_green_targets_red" in acc.Tags()["images"]


def test_mae_stage_then_salt_against_it(tiny_config, tmp_path):
    teacher_dir = tmp_path / "teacher"
    train(tiny_config("train.objective=mae", "train.loss=mse", "train.total_steps=3", f"run.dir={teacher_dir}"))
    result = train(
        tiny_config("train.total_steps=3", f"teacher.checkpoint={teacher_dir}", f"run.dir={tmp_path / 'student'}")
    )
    assert result.step == 3 and result.loss == result.loss  # finite
    meta = rundir.read_meta(rundir.latest_checkpoint(tmp_path / "student"))
    assert meta["teacher"]["source"] == str(teacher_dir.resolve()) and len(meta["teacher"]["sha256"]) == 64


def test_resuming_against_another_teacher_is_refused(tiny_config, tmp_path):
    teacher_dir = tmp_path / "teacher"
    train(tiny_config("train.objective=mae", "train.total_steps=2", f"run.dir={teacher_dir}"))
    train(tiny_config("train.total_steps=4", "run.stop_at_step=2", f"run.dir={tmp_path / 'student'}"))
    record = (tmp_path / "student" / "resolved_config.yaml").read_text()
    with pytest.raises(UserError, match=f"teacher.checkpoint: 'none' -> '{teacher_dir}'.*start a new run.dir"):
        train(
            tiny_config("train.total_steps=4", f"teacher.checkpoint={teacher_dir}", f"run.dir={tmp_path / 'student'}")
        )
    assert (tmp_path / "student" / "resolved_config.yaml").read_text() == record  # the refusal wrote nothing


def test_non_finite_steps_are_skipped_then_stop(tiny_config, tmp_path):
    cfg = tiny_config(
        "train.total_steps=20",
        "optim.lr=1e30",
        "optim.start_lr=1e30",
        "optim.clip_grad=0",
        "train.max_nonfinite=3",
        "checkpoint.every_steps=1",
    )
    with pytest.raises(UserError, match="not finite for 3 steps in a row"):
        train(cfg)
    skipped = scalars(tmp_path / "run", "train/nonfinite_skipped")
    assert max(skipped.values()) == 3
    # the parameters on disk are finite: skipped steps never reached the optimizer
    path = rundir.latest_checkpoint(tmp_path / "run")
    from usjepa.eval.backbones import load_backbone

    encoder, _ = load_backbone("student", tmp_path / "run", torch.device("cpu"))
    assert path is not None and all(torch.isfinite(p).all() for p in encoder.parameters())


def test_validation_loss_at_checkpoints_and_best_is_kept(tiny_config, tmp_path):
    train(tiny_config("train.total_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=1"))
    run = tmp_path / "run"
    val = scalars(run, "val/loss")
    assert sorted(val) == [2, 4, 6, 8]
    best_step = min(val, key=val.get)
    best = rundir.best_checkpoint(run)
    assert best.name == f"step_{best_step:06d}"
    assert rundir.read_meta(best)["val_loss"] == pytest.approx(val[best_step])
    # pruning keeps the newest and the best
    assert {p.name for p in rundir.list_checkpoints(run)} == {best.name, "step_000008"}
    # the same masks and inputs every time: validating twice gives the same number
    from usjepa.train.loop import Trainer

    trainer = Trainer(tiny_config("train.total_steps=8", "checkpoint.every_steps=2"))
    assert trainer.validate()["loss"] == trainer.validate()["loss"] == pytest.approx(val[8])


def test_activation_checkpointing_keeps_the_losses(tiny_config, tmp_path):
    plain = train(tiny_config("train.total_steps=3", f"run.dir={tmp_path / 'plain'}"))
    recomputed = train(
        tiny_config("train.total_steps=3", "train.activation_checkpointing=true", f"run.dir={tmp_path / 'ac'}")
    )
    a, b = scalars(tmp_path / "plain", "train/loss"), scalars(tmp_path / "ac", "train/loss")
    assert plain.step == recomputed.step == 3 and a == pytest.approx(b, rel=1e-6)


@pytest.mark.slow
def test_compiled_blocks_keep_the_losses(tiny_config, tmp_path):
    # torch.compile on the CPU builds C++ kernels: minutes here, so one short run.
    train(tiny_config("train.total_steps=2", f"run.dir={tmp_path / 'plain'}"))
    train(tiny_config("train.total_steps=2", "train.compile=true", f"run.dir={tmp_path / 'compiled'}"))
    a, b = scalars(tmp_path / "plain", "train/loss"), scalars(tmp_path / "compiled", "train/loss")
    assert sorted(a) == sorted(b) == [1, 2] and a == pytest.approx(b, rel=1e-4)


def test_passes_left_without_samples_keep_every_rank_in_step(tiny_config, shards, tmp_path):
    # One sample per pass: a corrupt sample leaves a pass empty, which must still run (FSDP
    # ranks meet in every pass) and must not move the weights or the logged loss.
    from test_pipeline import _corrupt_first_train_shard

    broken = _corrupt_first_train_shard(shards, tmp_path / "broken")
    skip = "data.on_bad_shard=skip"  # the shard's checksum no longer matches: read it anyway
    result = train(tiny_config(f"data.shards={broken}", skip, "data.micro_batch_size=1", "train.total_steps=12"))
    assert result.step == 12 and math.isfinite(result.loss)
    assert max(scalars(tmp_path / "run", "data/corrupt_skipped").values()) > 0
    whole = tmp_path / "whole"
    train(tiny_config(f"data.shards={broken}", skip, "train.total_steps=12", f"run.dir={whole}"))
    a, b = scalars(tmp_path / "run", "train/loss"), scalars(whole, "train/loss")
    assert a == pytest.approx(b, rel=1e-4)


def test_probes_load_the_best_checkpoint_by_default_else_the_latest(tiny_config, tmp_path, capsys):
    from usjepa.eval.backbones import load_backbone
    from usjepa.models.vit import build_encoder

    train(tiny_config("train.total_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=3", "optim.lr=0.3"))
    run = tmp_path / "run"
    cfg = tiny_config()

    def encoder_at(path):
        encoder = build_encoder(cfg.model, cfg.data.image_size)
        rundir.load_module_weights(path, encoder, prefix="encoder.")
        return encoder.state_dict()

    best, latest = rundir.best_checkpoint(run), rundir.latest_checkpoint(run)
    loaded = load_backbone("student", run, torch.device("cpu"))[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in encoder_at(best).items())
    assert best != latest  # at this lr the validation loss is lowest before the end
    assert not all(torch.equal(loaded[k], v) for k, v in encoder_at(latest).items())
    unvalidated = tmp_path / "unvalidated"
    train(tiny_config("train.total_steps=2", "train.validate=false", f"run.dir={unvalidated}"))
    loaded = load_backbone("student", unvalidated, torch.device("cpu"))[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in encoder_at(rundir.latest_checkpoint(unvalidated)).items())
    assert "no checkpoint was validated" in capsys.readouterr().err


# -- the run dir's lock, TensorBoard writes, resume comparisons ------------------------------
def _world():
    from usjepa.train.parallel import World

    return World(0, 1, torch.device("cpu"))


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path):
    from usjepa.train.runlock import hold_run_dir

    run = tmp_path / "run"
    (run / ".lock").mkdir(parents=True)  # as unopenable as a read-only file system, without root
    with pytest.raises(UserError) as info:
        hold_run_dir(run, _world())
    assert str(info.value) == (
        f"run.dir={run}: cannot open its lock file {run / '.lock'} (Is a directory); a run writes its checkpoints "
        "and logs there: make it writable, or choose another run.dir"
    )


def test_a_refused_start_leaves_the_run_dir_as_it_found_it(tmp_path):
    from usjepa.train.runlock import hold_run_dir

    fresh = tmp_path / "a" / "b" / "run"
    lock = hold_run_dir(fresh, _world())
    assert "pid" in (fresh / ".lock").read_text()
    with pytest.raises(UserError, match=f"run.dir={fresh} is in use by the run of host .* pid "):
        hold_run_dir(fresh, _world())  # flock: a second open file is refused in the same process too
    lock.release(undo=True)
    assert not (tmp_path / "a").exists()  # the lock file and the folders it created are gone

    old = tmp_path / "old"
    old.mkdir()
    (old / ".lock").write_text("host h pid 1 since then\n")
    hold_run_dir(old, _world()).release(undo=True)
    assert (old / ".lock").read_text() == "host h pid 1 since then\n"
    hold_run_dir(old, _world()).release()  # an accepted run leaves its own line for the next one
    assert (old / ".lock").read_text() != "host h pid 1 since then\n"


def test_an_event_file_that_cannot_be_written_is_one_line_and_keeps_whole_events(tmp_path, monkeypatch):
    import os

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from usjepa.train import tblog

    writer = tblog.EventWriter(tmp_path / "tb", resume_point=lambda: "step_000020")
    writer.add_scalar("a", 1.0, 1)
    size = writer.path.stat().st_size
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data[:7]))  # part of the event, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tblog.os, "write", disk_full)
    with pytest.raises(UserError) as info:
        writer.add_scalar("a", 2.0, 2)
    assert str(info.value) == (
        f"cannot write TensorBoard events to {writer.path} (No space left on device); check the free disk space "
        "and file-size limit (ulimit -f), then rerun: the run resumes from step_000020, which is intact"
    )
    monkeypatch.undo()
    writer.add_scalar("a", 3.0, 3)  # a failed writer writes nothing more
    writer.close()
    assert writer.path.stat().st_size == size
    steps = [e.step for e in EventFileLoader(str(writer.path)).Load() if e.summary.value]
    assert steps == [1]


def test_a_folder_spelled_another_way_is_the_same_setting_on_resume(tiny_config, shards, tmp_path, monkeypatch):
    cfg = tiny_config()
    rundir.make_run_dir(tmp_path / "run")
    rundir.write_resolved_config(cfg)
    spellings = (f"{shards}/", shards.name, f"./{shards.name}/", f"../{shards.parent.name}/{shards.name}")
    same = [tiny_config(f"data.shards={spelling}") for spelling in spellings]
    mixture = tiny_config(f"data.mixture=[{{shards: {shards.name}/}}]", "data.shards=")
    other = tiny_config(f"data.shards={tmp_path}")
    teacher = tiny_config(f"run.dir={tmp_path / 'student'}", f"teacher.checkpoint={tmp_path / 'teacher'}")
    monkeypatch.chdir(shards.parent)  # where the relative spellings are relative to
    for spelling, resumed in zip(spellings, same):
        assert rundir.run_drift(resumed) == [], spelling
    assert rundir.run_drift(mixture) == ["data.mixture", "data.shards"]  # another setting, though the same folder
    assert rundir.run_drift(other) == ["data.shards"]
    rundir.make_run_dir(tmp_path / "student")
    rundir.write_resolved_config(teacher)
    monkeypatch.chdir(tmp_path)
    assert rundir.run_drift(replace(teacher, teacher=replace(teacher.teacher, checkpoint="teacher/"))) == []
