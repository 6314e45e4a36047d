"""FLOPs of the tokens a step actually processes, from the modules' shapes.

Counted are the matrix multiplications (patch embedding, attention projections, the
attention itself, MLPs, the predictor's input and output maps): everything else in a ViT is
a few percent. A training pass costs three forwards (the backward is two: gradients of
inputs and of weights), the usual model-FLOPs convention; recomputation under activation
checkpointing is not counted, so the figure measures work done for the model, not by the
machine. Targets computed without gradient (frozen teacher, EMA target) cost one forward.
"""

from __future__ import annotations

from torch import nn


def blocks_forward_flops(blocks: nn.ModuleList, tokens: int) -> float:
    """Forward FLOPs of timm transformer `blocks` on one sequence of `tokens` tokens."""
    total = 0.0
    for block in blocks:
        dim, hidden = block.mlp.fc1.in_features, block.mlp.fc1.out_features
        # qkv (3 d^2) + output projection (d^2) + MLP (2 d h) per token; QK^T and AV 2 n^2 d each.
        total += 2 * tokens * (4 * dim * dim + 2 * dim * hidden) + 4 * tokens * tokens * dim
    return total


def encoder_forward_flops(encoder: nn.Module, tokens: int) -> float:
    """Forward FLOPs of an Encoder that embeds every patch of the image and then runs its
    blocks on `tokens` of them (the context; all of them for a target encoder)."""
    dim, _, p, q = encoder.patch_embed.proj.weight.shape
    in_chans = encoder.patch_embed.proj.weight.shape[1]
    patches = encoder.patch_embed.num_patches
    return 2 * patches * in_chans * p * q * dim + blocks_forward_flops(encoder.blocks,
                                                                       tokens + encoder.num_prefix_tokens)


def predictor_forward_flops(predictor: nn.Module, context: int, target: int, n_targets: int) -> float:
    """Forward FLOPs of the Predictor for one sample: the context embedded once, then one pass
    of context + `target` mask tokens per target block."""
    embed, proj = predictor.embed, predictor.proj
    per_block = blocks_forward_flops(predictor.blocks, context + target) \
        + 2 * target * proj.in_features * proj.out_features
    return 2 * context * embed.in_features * embed.out_features + n_targets * per_block


def step_flops(student: nn.Module, target_encoder: nn.Module | None, samples: int, context: int, target: int,
               n_targets: int) -> float:
    """FLOPs of one training step on `samples` samples with context and target blocks of
    `context` and `target` patches: three forwards of the student (encoder + predictor), one
    of the target encoder on every patch."""
    trained = encoder_forward_flops(student.encoder, context) + \
        predictor_forward_flops(student.predictor, context, target, n_targets)
    frozen = encoder_forward_flops(target_encoder, target_encoder.patch_embed.num_patches) if target_encoder else 0.0
    return samples * (3 * trained + frozen)
