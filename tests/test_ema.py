"""The I-JEPA baseline (train.objective=ema): the moving-average update, its schedule, and a
run that resumes exactly with its target encoder."""

import copy

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from usjepa import rundir
from usjepa.config import ModelConfig
from usjepa.data.pipeline import make_train_loader
from usjepa.models.vit import build_encoder
from usjepa.train.ema import ema_update, make_target
from usjepa.train.flops import sample_flops
from usjepa.train.loop import Trainer, train
from usjepa.train.schedules import ema_momentum


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_momentum_schedule_is_linear_over_the_run():
    assert ema_momentum(0, 100, 0.996, 1.0) == 0.996
    assert ema_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998, abs=1e-15)
    assert ema_momentum(25, 100, 0.9, 0.98) == pytest.approx(0.92, abs=1e-15)
    assert ema_momentum(100, 100, 0.996, 1.0) == 1.0
    assert ema_momentum(130, 100, 0.996, 1.0) == 1.0  # past the end it stays


def test_an_update_moves_the_target_by_one_minus_m_of_the_difference():
    arch = ModelConfig(patch_size=8, embed_dim=16, depth=2, num_heads=2)
    online = build_encoder(arch, 32, attention="sdpa")
    target = make_target(online)
    assert not any(p.requires_grad for p in target.parameters()) and not target.training
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update(target, online, 0.9)
    for name, value in target.state_dict().items():
        expected = before[name] + 0.1 * (online.state_dict()[name] - before[name])
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
    frozen = copy.deepcopy(target.state_dict())
    ema_update(target, online, 1.0)  # momentum 1 freezes the target
    assert all(torch.equal(v, frozen[k]) for k, v in target.state_dict().items())


def test_a_training_step_updates_the_target_toward_the_trained_encoder(tiny_config):
    cfg = tiny_config("train.objective=ema", "train.ema_momentum=[0.9,1.0]", "train.total_steps=10")
    trainer = Trainer(cfg)
    # The target starts as the student's encoder, then lags behind it.
    assert all(
        torch.equal(a, b)
        for a, b in zip(trainer.ema_target.state_dict().values(), trainer.student.encoder.state_dict().values())
    )
    batch = next(make_train_loader(cfg, trainer.shard_set))
    before = {k: v.clone() for k, v in trainer.ema_target.state_dict().items()}
    outcome = trainer.train_step(batch)
    assert outcome.finite
    expected = sum(
        sample_flops(trainer.student, trainer.ema_target, len(m.context), [len(t) for t in m.targets])
        for m in batch["masks"]
    )
    assert outcome.flops == expected and outcome.kept_fraction == 1.0
    student = trainer.student.encoder.state_dict()
    moved = 0
    for name, value in trainer.ema_target.state_dict().items():
        expected = before[name] + (1 - 0.9) * (student[name] - before[name])  # momentum at step 0
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
        moved += not torch.equal(value, before[name])
    assert moved > 0
    # predictor output is the target encoder's width
    assert trainer.student.predictor.proj.out_features == cfg.model.embed_dim


def test_an_ema_run_resumes_exactly_with_its_target(tiny_config, tmp_path):
    common = ["train.objective=ema", "train.total_steps=6", "checkpoint.every_steps=3"]
    train(tiny_config(*common, f"run.dir={tmp_path / 'full'}"))
    train(tiny_config(*common, f"run.dir={tmp_path / 'split'}", "run.stop_at_step=3"))
    train(tiny_config(*common, f"run.dir={tmp_path / 'split'}"))
    a, b = scalars(tmp_path / "full", "train/loss"), scalars(tmp_path / "split", "train/loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s] == b[s] for s in a), (a, b)  # bit-identical: the target was restored, not re-copied
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(rundir.latest_checkpoint(tmp_path / "full"))).read_metadata().state_dict_metadata
    assert any(k.startswith("target.blocks.0.") for k in keys) and not any("teacher" in k for k in keys)
    targets = [
        Trainer(tiny_config(*common, f"run.dir={tmp_path / run}")).ema_target.state_dict() for run in ("full", "split")
    ]
    assert all(torch.equal(targets[0][k], targets[1][k]) for k in targets[0])
    val = {tag: scalars(tmp_path / "full", f"val/{tag}") for tag in ("loss", "student_rankme", "target_rankme")}
    assert all(sorted(v) == [3, 6] for v in val.values()), val


def test_every_objective_logs_the_flops_of_its_steps(tiny_config, tmp_path):
    for objective in ("mae", "salt", "ema"):
        run = tmp_path / objective
        train(tiny_config(f"train.objective={objective}", "train.total_steps=2", f"run.dir={run}"))
        tflops = scalars(run, "perf/tflops")
        assert sorted(tflops) == [1, 2] and all(v > 0 for v in tflops.values())
        total = scalars(run, "perf/total_pflops")
        assert total[2] == pytest.approx((tflops[1] + tflops[2]) / 1000, rel=1e-6)
        assert rundir.read_meta(rundir.latest_checkpoint(run))["counters"]["flops"] == pytest.approx(
            1e12 * total[2] * 1e3
        )


def test_probe_backbones_of_an_ema_run(tiny_config, tmp_path):
    from usjepa.errors import UserError
    from usjepa.eval.backbones import load_backbone

    train(tiny_config("train.objective=ema", "train.total_steps=2", "optim.warmup_steps=1"))
    run = tmp_path / "run"
    trainer = Trainer(tiny_config("train.objective=ema", "train.total_steps=2"))
    target, _ = load_backbone("target", run, torch.device("cpu"))
    student, _ = load_backbone("student", run, torch.device("cpu"))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in trainer.ema_target.state_dict().items())
    assert all(torch.equal(student.state_dict()[k], v) for k, v in trainer.student.encoder.state_dict().items())
    assert not all(torch.equal(target.state_dict()[k], v) for k, v in student.state_dict().items())
    with pytest.raises(UserError, match="without a frozen teacher: .* --backbone target"):
        load_backbone("teacher", run, torch.device("cpu"))
