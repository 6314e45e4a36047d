"""The narrow predictor: context tokens + mask tokens at target positions -> target features.

Stage 2 (SALT) regresses the teacher's latents (out_dim = teacher width); stage 1 (MAE with
multi-block masks) reuses it as the pixel decoder (out_dim = patch_size**2).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from usjepa.config import PredictorConfig
from usjepa.models.attention import attention_layer
from usjepa.models.vit import attention_backend, gather_tokens, run_blocks, sincos_pos_embed


class Predictor(nn.Module):
    def __init__(self, *, in_dim: int, out_dim: int, grid: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, attention: str = "sdpa"):
        super().__init__()
        self.attention = attention  # sdpa | xformers | auto (resolved on first forward)
        self.grad_checkpointing = False  # recompute block activations in the backward
        self.embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, embed_dim).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True,
                                          norm_layer=nn.LayerNorm, attn_layer=attention_layer(attention))
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, out_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, context_tokens: torch.Tensor, context_idx: torch.Tensor,
                target_idx: torch.Tensor) -> torch.Tensor:
        """context_tokens [B, Kc, in_dim], context_idx [B, Kc], target_idx [T, B, Kt] -> [T*B, Kt, out_dim].

        Each target block is predicted in its own pass (the context is repeated T times), so
        blocks cannot see each other's mask tokens.
        """
        n_targets = target_idx.shape[0]
        batch_pos = self.pos_embed.expand(context_tokens.shape[0], -1, -1)
        x = self.embed(context_tokens) + gather_tokens(batch_pos, context_idx)
        x = x.repeat(n_targets, 1, 1)
        flat_targets = target_idx.flatten(0, 1)
        masks = self.mask_token + gather_tokens(batch_pos.repeat(n_targets, 1, 1), flat_targets)
        x = run_blocks(self.blocks, torch.cat([x, masks], dim=1), self.grad_checkpointing)
        return self.proj(self.norm(x[:, -flat_targets.shape[1]:]))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_predictor(cfg: PredictorConfig, in_dim: int, out_dim: int, grid: int, *,
                    attention: str = "auto", device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> Predictor:
    """The predictor for `cfg`; `attention` is the `model.attention` setting (the predictor
    follows the student's), resolved for `device`/`dtype` when given, else on first forward."""
    return Predictor(in_dim=in_dim, out_dim=out_dim, grid=grid, embed_dim=cfg.embed_dim,
                     depth=cfg.depth, num_heads=cfg.num_heads,
                     attention=attention_backend(attention, device, dtype))
