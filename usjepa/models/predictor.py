"""The narrow predictor: context tokens + mask tokens at target positions -> target features.

Stage 2 (SALT) regresses the teacher's latents (out_dim = teacher width); stage 1 (MAE with
multi-block masks) reuses it as the pixel decoder (out_dim = patch_size**2). Masks arrive
padded with valid flags (data/masks.py): padding is never attended to. Two layouts
(`predictor.layout`) predict the target blocks: `per_block` repeats the context once per
block; `shared_context` runs one sequence [context, block 0, ..., block T-1] under an
attention mask in which a block sees the context and itself and the context sees itself.
"""

from __future__ import annotations

import torch
from timm.models import named_apply
from timm.models.vision_transformer import get_init_weights_vit
from torch import nn

from usjepa.config import PredictorConfig
from usjepa.models.attention import attention_layer
from usjepa.models.vit import (
    PackedBlock,
    attention_backend,
    gather_tokens,
    key_padding_mask,
    run_blocks,
    sincos_pos_embed,
    timm_init_mode,
)


class Predictor(nn.Module):
    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        grid: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attention: str = "sdpa",
        layout: str = "shared_context",
        init: str = "timm",
    ):
        super().__init__()
        self.layout = layout  # per_block | shared_context (PredictorConfig.layout)
        self.attention = attention  # sdpa | xformers | auto (resolved on first forward)
        self.grad_checkpointing = False  # recompute block activations in the backward
        self.embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, embed_dim).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            PackedBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=True,
                norm_layer=nn.LayerNorm,
                attn_layer=attention_layer(attention),
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, out_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # The encoder's scheme (`model.init`), by timm's own initialisers.
        named_apply(get_init_weights_vit(timm_init_mode(init)), self)

    def forward(
        self,
        context_tokens: torch.Tensor,
        context_idx: torch.Tensor,
        target_idx: torch.Tensor,
        context_valid: torch.Tensor | None = None,
        target_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """context_tokens [B, Kc, in_dim] at positions context_idx [B, Kc], target blocks
        target_idx [T, B, Kt] -> predictions [T*B, Kt, out_dim] (block-major, as the targets).

        `context_valid` [B, Kc] and `target_valid` [T, B, Kt] mark padding (False), which no
        token attends to; None: nothing padded. Blocks never see each other's mask tokens, in
        either layout.
        """
        n_targets, batch, kt = target_idx.shape
        batch_pos = self.pos_embed.expand(batch, -1, -1)
        context = self.embed(context_tokens) + gather_tokens(batch_pos, context_idx)
        padded = context_valid is not None or target_valid is not None
        context_valid = _all_valid(context_idx) if context_valid is None else context_valid
        target_valid = _all_valid(target_idx) if target_valid is None else target_valid
        if self.layout == "shared_context":
            # [B, T*Kt] mask tokens after the context, one pass for all blocks.
            flat_idx = target_idx.permute(1, 0, 2).reshape(batch, n_targets * kt)
            masks = self.mask_token + gather_tokens(batch_pos, flat_idx)
            valid = torch.cat([context_valid, target_valid.permute(1, 0, 2).reshape(batch, -1)], dim=1)
            x = run_blocks(
                self.blocks,
                torch.cat([context, masks], dim=1),
                self.grad_checkpointing,
                shared_context_mask(valid, context.shape[1], n_targets, kt),
                valid if padded else None,
            )
            out = x[:, context.shape[1] :].reshape(batch, n_targets, kt, -1).transpose(0, 1).flatten(0, 1)
        else:  # per_block: the context is repeated once per block
            context = context.repeat(n_targets, 1, 1)
            flat_idx = target_idx.flatten(0, 1)
            masks = self.mask_token + gather_tokens(batch_pos.repeat(n_targets, 1, 1), flat_idx)
            valid = torch.cat([context_valid.repeat(n_targets, 1), target_valid.flatten(0, 1)], dim=1)
            valid = valid if padded else None
            x = run_blocks(
                self.blocks, torch.cat([context, masks], dim=1), self.grad_checkpointing, key_padding_mask(valid), valid
            )
            out = x[:, -kt:]
        return self.proj(self.norm(out))


def _all_valid(idx: torch.Tensor) -> torch.Tensor:
    return torch.ones(idx.shape, dtype=torch.bool, device=idx.device)


def shared_context_mask(valid: torch.Tensor, n_context: int, n_targets: int, block_len: int) -> torch.Tensor:
    """Boolean attention mask [B, 1, L, L] of the shared-context layout (L = Kc + T*Kt): a
    context query attends to valid context keys; a query of block t to valid context keys
    and the valid keys of block t."""
    group = torch.cat(
        [
            torch.full((n_context,), -1, device=valid.device),
            torch.arange(n_targets, device=valid.device).repeat_interleave(block_len),
        ]
    )
    same = (group[None, :] == -1) | (group[None, :] == group[:, None])  # [L queries, L keys]
    return (same[None] & valid[:, None, :])[:, None]


def build_predictor(
    cfg: PredictorConfig,
    in_dim: int,
    out_dim: int,
    grid: int,
    *,
    attention: str = "auto",
    init: str = "timm",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Predictor:
    """The predictor for `cfg`; `attention` and `init` are the `model.` settings (the predictor
    follows the student's), attention resolved for `device`/`dtype` when given, else on first
    forward."""
    return Predictor(
        in_dim=in_dim,
        out_dim=out_dim,
        grid=grid,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        layout=cfg.layout,
        init=init,
        attention=attention_backend(attention, device, dtype),
    )
