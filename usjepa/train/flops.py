"""FLOPs of the tokens a step actually processes, from the modules' shapes.

Counted are the matrix multiplications (patch embedding, attention projections, the
attention itself, MLPs, the predictor's input and output maps): everything else in a ViT is
a few percent. A training pass costs three forwards (the backward is two: gradients of
inputs and of weights), the usual model-FLOPs convention; recomputation under activation
checkpointing is not counted, so the figure measures work done for the model, not by the
machine. Targets computed without gradient (frozen teacher, EMA target) cost one forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def blocks_forward_flops(blocks: nn.ModuleList, tokens: int, attended: int | None = None) -> float:
    """Forward FLOPs of timm transformer `blocks` on one sequence of `tokens` tokens, of which
    `attended` (query, key) pairs are attended (all tokens x tokens unless masked)."""
    attended = tokens * tokens if attended is None else attended
    total = 0.0
    for block in blocks:
        dim, hidden = block.mlp.fc1.in_features, block.mlp.fc1.out_features
        # qkv (3 d^2) + output projection (d^2) + MLP (2 d h) per token; QK^T and AV 2 d per pair each.
        total += 2 * tokens * (4 * dim * dim + 2 * dim * hidden) + 4 * attended * dim
    return total


def encoder_forward_flops(encoder: nn.Module, tokens: int) -> float:
    """Forward FLOPs of an Encoder that embeds every patch of the image and then runs its
    blocks on `tokens` of them (the context; all of them for a target encoder)."""
    dim, _, p, q = encoder.patch_embed.proj.weight.shape
    in_chans = encoder.patch_embed.proj.weight.shape[1]
    patches = encoder.patch_embed.num_patches
    return 2 * patches * in_chans * p * q * dim + blocks_forward_flops(
        encoder.blocks, tokens + encoder.num_prefix_tokens
    )


def predictor_forward_flops(predictor: nn.Module, context: int, targets: Sequence[int]) -> float:
    """Forward FLOPs of the Predictor for one sample with a context of `context` patches and
    target blocks of `targets` patches, in the predictor's layout: per block, the context plus
    one block per pass; shared context, one pass where the context attends to itself and each
    block to the context and itself."""
    embed, proj = predictor.embed, predictor.proj
    if predictor.layout == "shared_context":
        attended = context * context + sum(t * (context + t) for t in targets)
        passes = blocks_forward_flops(predictor.blocks, context + sum(targets), attended)
    else:
        passes = sum(blocks_forward_flops(predictor.blocks, context + t) for t in targets)
    return (
        2 * context * embed.in_features * embed.out_features
        + passes
        + 2 * sum(targets) * proj.in_features * proj.out_features
    )


def sample_flops(student: nn.Module, target_encoder: nn.Module | None, context: int, targets: Sequence[int]) -> float:
    """FLOPs of one sample of a training step, with a context of `context` patches and target
    blocks of `targets` patches: three forwards of the student (encoder + predictor), one of
    the target encoder on every patch."""
    trained = encoder_forward_flops(student.encoder, context) + predictor_forward_flops(
        student.predictor, context, targets
    )
    frozen = encoder_forward_flops(target_encoder, target_encoder.patch_embed.num_patches) if target_encoder else 0.0
    return 3 * trained + frozen


def batch_flops(
    student: nn.Module, target_encoder: nn.Module | None, context_valid: torch.Tensor, target_valid: torch.Tensor
) -> float:
    """FLOPs of a collated batch (valid flags [B, Kc] and [T, B, Kt]): padding is not work."""
    contexts = context_valid.sum(1).tolist()
    blocks = target_valid.sum(2).T.tolist()  # [B][T]
    return sum(sample_flops(student, target_encoder, c, t) for c, t in zip(contexts, blocks))


# Dense peak TFLOP/s per device and precision (bf16 autocast | fp32 without TF32), for MFU.
# GPUs: NVIDIA datasheets (SXM, no sparsity). cpu: measured on the 2-core development machine
# (a 2048^2 matmul on both cores, `python tools/bench_step.py --peak`); another CPU gets its own
# figure from that command, given as log.peak_tflops.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "cpu": {"bf16": 0.41, "fp32": 0.18},
}


def peak_tflops(device: torch.device, precision: str, setting: float = 0.0) -> float | None:
    """Peak TFLOP/s of one `device` in `precision`: `setting` when > 0 (log.peak_tflops), else
    the table's figure for the device's name; None for a device the table does not know."""
    if setting > 0:
        return setting
    if device.type != "cuda":
        return PEAK_TFLOPS["cpu"][precision]
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for model, peaks in PEAK_TFLOPS.items() if model in name), None)
