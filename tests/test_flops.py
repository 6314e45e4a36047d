"""Model FLOPs from module shapes, checked against PyTorch's own operation counter."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from usjepa.config import ModelConfig, PredictorConfig
from usjepa.models.predictor import build_predictor
from usjepa.models.vit import build_encoder
from usjepa.train.flops import batch_flops, encoder_forward_flops, predictor_forward_flops, sample_flops
from usjepa.train.loop import Student


def counted(fn) -> int:
    # The math kernel spells attention out as matmuls, which the counter sees (the fused CPU
    # kernel it does not count).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.fixture
def parts():
    torch.manual_seed(0)
    encoder = build_encoder(
        ModelConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0), 48, attention="sdpa"
    )
    predictor = build_predictor(
        PredictorConfig(depth=2, embed_dim=16, num_heads=2, layout="per_block"), 32, 24, grid=6, attention="sdpa"
    )
    return encoder, predictor


def test_encoder_flops_match_the_counter_on_a_context_and_on_every_patch(parts):
    encoder, _ = parts
    batch = 3  # the functions count one sample
    images = torch.randn(batch, 1, 48, 48)
    context = torch.stack([torch.randperm(36)[:11] for _ in range(batch)])
    assert batch * encoder_forward_flops(encoder, 11) == counted(lambda: encoder(images, context))
    assert batch * encoder_forward_flops(encoder, 36) == counted(lambda: encoder(images))


def test_per_block_predictor_flops_match_the_counter(parts):
    # Per block the math kernel's every (query, key) pair is attended, so the counts agree.
    encoder, predictor = parts
    batch = 2
    tokens = torch.randn(batch, 9, 32)
    context = torch.stack([torch.randperm(36)[:9] for _ in range(batch)])
    targets = torch.stack([torch.stack([torch.randperm(36)[:5] for _ in range(batch)]) for _ in range(4)])
    assert batch * predictor_forward_flops(predictor, 9, [5] * 4) == counted(
        lambda: predictor(tokens, context, targets)
    )


def test_shared_context_flops_count_only_the_attended_pairs(parts):
    # The math kernel computes every (query, key) pair of the masked sequence; the model
    # FLOPs leave out the pairs the mask hides (context -> blocks, block -> other blocks).
    _, predictor = parts
    predictor.layout = "shared_context"
    tokens = torch.randn(1, 9, 32)
    context = torch.randperm(36)[:9][None]
    targets = torch.randperm(36)[:20].reshape(4, 1, 5)
    length, attended = 9 + 20, 9 * 9 + 4 * 5 * (9 + 5)
    hidden = sum(4 * (length * length - attended) * 16 for _ in predictor.blocks)
    shared = predictor_forward_flops(predictor, 9, [5] * 4)
    assert shared == counted(lambda: predictor(tokens, context, targets)) - hidden
    # The context passes through the blocks once instead of four times.
    predictor.layout = "per_block"
    per_block = predictor_forward_flops(predictor, 9, [5] * 4)
    # Per block the context runs 3 more times (27 token rows) and attends to itself 3 more
    # times and to each block's mask tokens (3 * 81 + 4 * 45 = 423 pairs); width 16, MLP 64.
    per_layer = 27 * 2 * (4 * 16 * 16 + 2 * 16 * 64) + 4 * 423 * 16
    assert per_block - shared == len(predictor.blocks) * per_layer


def test_a_step_costs_three_student_forwards_and_one_target_forward(parts):
    encoder, predictor = parts
    student = Student(encoder, predictor)
    teacher = build_encoder(ModelConfig(patch_size=8, embed_dim=24, depth=1, num_heads=2), 48, attention="sdpa")
    per_sample = 3 * (encoder_forward_flops(encoder, 20) + predictor_forward_flops(predictor, 20, [6, 4, 5, 6]))
    assert sample_flops(student, None, 20, [6, 4, 5, 6]) == per_sample
    assert sample_flops(student, teacher, 20, [6, 4, 5, 6]) == per_sample + encoder_forward_flops(teacher, 36)


def test_padding_is_not_counted_as_work(parts):
    encoder, predictor = parts
    student = Student(encoder, predictor)
    context_valid = torch.tensor([[True] * 20, [True] * 12 + [False] * 8])
    target_valid = torch.ones(4, 2, 6, dtype=torch.bool)
    target_valid[1, 0, 3:] = False
    expected = sample_flops(student, None, 20, [6, 3, 6, 6]) + sample_flops(student, None, 12, [6] * 4)
    assert batch_flops(student, None, context_valid, target_valid) == expected
