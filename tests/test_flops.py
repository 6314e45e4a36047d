"""Model FLOPs from module shapes, checked against PyTorch's own operation counter."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from usjepa.config import ModelConfig, PredictorConfig
from usjepa.models.predictor import build_predictor
from usjepa.models.vit import build_encoder
from usjepa.train.flops import encoder_forward_flops, predictor_forward_flops, step_flops
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
    encoder = build_encoder(ModelConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0), 48,
                            attention="sdpa")
    predictor = build_predictor(PredictorConfig(depth=2, embed_dim=16, num_heads=2), 32, 24, grid=6,
                                attention="sdpa")
    return encoder, predictor


def test_encoder_flops_match_the_counter_on_a_context_and_on_every_patch(parts):
    encoder, _ = parts
    batch = 3  # the functions count one sample
    images = torch.randn(batch, 1, 48, 48)
    context = torch.stack([torch.randperm(36)[:11] for _ in range(batch)])
    assert batch * encoder_forward_flops(encoder, 11) == counted(lambda: encoder(images, context))
    assert batch * encoder_forward_flops(encoder, 36) == counted(lambda: encoder(images))


def test_predictor_flops_match_the_counter(parts):
    encoder, predictor = parts
    batch = 2
    tokens = torch.randn(batch, 9, 32)
    context = torch.stack([torch.randperm(36)[:9] for _ in range(batch)])
    targets = torch.stack([torch.stack([torch.randperm(36)[:5] for _ in range(batch)]) for _ in range(4)])
    assert batch * predictor_forward_flops(predictor, 9, 5, 4) == counted(lambda: predictor(tokens, context, targets))


def test_a_step_costs_three_student_forwards_and_one_target_forward(parts):
    encoder, predictor = parts
    student = Student(encoder, predictor)
    teacher = build_encoder(ModelConfig(patch_size=8, embed_dim=24, depth=1, num_heads=2), 48, attention="sdpa")
    per_sample = 3 * (encoder_forward_flops(encoder, 20) + predictor_forward_flops(predictor, 20, 6, 4))
    assert step_flops(student, None, 5, 20, 6, 4) == 5 * per_sample
    assert step_flops(student, teacher, 5, 20, 6, 4) == 5 * (per_sample + encoder_forward_flops(teacher, 36))
