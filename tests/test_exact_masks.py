"""The step trains on exactly the masks the generator draws: every sampled patch reaches the
loss, each block counts as one block, and a sample's loss and gradient do not depend on its
batch mates (checked against each sample and block run on its own, unpadded)."""

import math

import numpy as np
import pytest
import torch

from usjepa.data.masks import SampleMasks
from usjepa.data.pipeline import collate_batch, make_train_loader
from usjepa.train.loop import Trainer


def varied_masks(n: int, grid_patches: int = 16, n_targets: int = 4) -> list[SampleMasks]:
    """Masks whose context and block lengths all differ between samples and blocks, at
    shuffled (not sorted-prefix) positions."""
    rng = np.random.default_rng(0)
    masks = []
    for i in range(n):
        order = rng.permutation(grid_patches)
        lengths = [1 + (i + t) % 3 for t in range(n_targets)]
        targets, used = [], 0
        for k in lengths:
            targets.append(np.sort(order[used : used + k]))
            used += k
        context = np.sort(order[used : used + 2 + i % 4])
        masks.append(SampleMasks(context=context, targets=tuple(targets)))
    return masks


def grads(module: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    module.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(
    "objective,layout",
    [("mae", "per_block"), ("salt", "per_block"), ("salt", "shared_context"), ("ema", "shared_context")],
)
def test_a_packed_batch_equals_each_sample_and_block_on_its_own(tiny_config, objective, layout):
    cfg = tiny_config(
        f"train.objective={objective}", f"predictor.layout={layout}", "model.drop_path=0", "predictor.depth=2"
    )
    trainer = Trainer(cfg)
    batch = next(make_train_loader(cfg, trainer.shard_set))
    batch["masks"] = varied_masks(len(batch["ids"]))
    whole = trainer._on_device(collate_batch(batch))
    loss, _ = trainer.loss(whole, trainer.targets(whole))
    loss.backward()
    packed = grads(trainer.student)

    reference, n = 0.0, len(batch["masks"]) * cfg.mask.num_targets
    for i, m in enumerate(batch["masks"]):
        for block in m.targets:
            alone = {
                "images": batch["images"][i : i + 1],
                "context": torch.from_numpy(m.context)[None],
                "targets": torch.from_numpy(block)[None, None],
            }
            alone["context_valid"] = torch.ones_like(alone["context"], dtype=torch.bool)
            alone["target_valid"] = torch.ones_like(alone["targets"], dtype=torch.bool)
            part_loss, _ = trainer.loss(alone, trainer.targets(alone))
            (part_loss / n).backward()
            reference += part_loss.item() / n
    assert loss.item() == pytest.approx(reference, rel=1e-5)
    for got, want in zip(packed, grads(trainer.student), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_every_drawn_token_is_trained_on_unless_truncation_is_asked_for(tiny_config, tmp_path):
    cfg = tiny_config("train.objective=mae")
    trainer = Trainer(cfg)
    batch = next(make_train_loader(cfg, trainer.shard_set))
    masks = varied_masks(len(batch["ids"]))
    drawn_context = np.mean([len(m.context) for m in masks])
    drawn_target = np.mean([sum(len(t) for t in m.targets) for m in masks])
    outcome = trainer.train_step({**batch, "masks": masks})
    assert outcome.kept_fraction == 1.0
    assert outcome.context_tokens == drawn_context and outcome.target_tokens == drawn_target

    # Its own run dir: a run dir has one trainer at a time (the first still holds this one).
    cut = Trainer(tiny_config("train.objective=mae", "mask.truncate_to_shortest=true", f"run.dir={tmp_path / 'cut'}"))
    outcome = cut.train_step({**batch, "masks": masks})
    shortest_context, shortest_block = 2, 1  # of varied_masks(8)
    assert outcome.context_tokens == shortest_context and outcome.target_tokens == 4 * shortest_block
    assert outcome.kept_fraction == pytest.approx((2 + 4) / (drawn_context + drawn_target))


def test_a_part_without_padding_runs_unmasked(tiny_config):
    # Valid flags without a False become None on the host, so the unmasked kernels run and no
    # device sync is needed to find that out.
    cfg = tiny_config("train.objective=mae")
    trainer = Trainer(cfg)
    batch = next(make_train_loader(cfg, trainer.shard_set))
    batch["masks"] = varied_masks(len(batch["ids"]))
    padded = trainer._on_device(collate_batch(batch))
    assert padded["context_valid"] is not None and padded["target_valid"] is not None
    cut = trainer._on_device(collate_batch(batch, (2, 1)))
    assert cut["context_valid"] is None and cut["target_valid"] is None
    loss, _ = trainer.loss(cut, trainer.targets(cut))
    assert math.isfinite(loss.item())
