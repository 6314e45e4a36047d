"""The ViT encoder shared by student, teacher and the stage-1 MAE model.

It *is* a timm `VisionTransformer` (single-channel input, no head), so its parameter names
are timm's: timm weights load into it and its weights load into
`timm.create_model(..., in_chans=1, num_classes=0, global_pool='', class_token=False)`.
What it adds is a forward pass over a subset of patch positions (the JEPA context).
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from usjepa.config import ModelConfig
from usjepa.models.attention import BackendAttention, attention_layer, resolve_backend


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` [B, K] of tokens `x` [B, N, D] -> [B, K, D]."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def run_blocks(
    blocks: torch.nn.ModuleList,
    x: torch.Tensor,
    recompute: bool,
    attn_mask: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x` [B, N, D] through `blocks`, attending where `attn_mask` (boolean, broadcastable to
    [B, heads, N, N]) is True; with `recompute`, each block's activations are recomputed in
    the backward instead of stored (activation checkpointing).

    `valid` [B, N] marks the real tokens of a padded `x` (`attn_mask` must hide the others as
    keys); the outputs of padding rows mean nothing. Where the blocks allow it (`packable`),
    the token-wise layers (norms, projections, MLP: about 95% of a ViT block's FLOPs at these
    lengths) run on the real tokens only, packed into one [tokens, D] matrix, and only the
    attention kernel sees them padded (padding rows then come back as zeros): a JEPA context
    padded to the longest of its batch is about a fifth padding."""
    shape, extra = x.shape, {}
    if valid is not None and packable(blocks):
        rows = valid.flatten().nonzero().squeeze(1)
        x = x.flatten(0, 1).index_select(0, rows)
        extra = dict(rows=rows, batch=shape[0], length=shape[1])
    for block in blocks:  # through the block's own call, so FSDP2's hooks and torch.compile apply
        if recompute and torch.is_grad_enabled():
            x = checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False, **extra)
        else:
            x = block(x, attn_mask=attn_mask, **extra)
    if not extra:
        return x
    return x.new_zeros(shape[0] * shape[1], shape[2]).index_copy(0, extra["rows"], x).view(shape)


def packable(blocks: torch.nn.ModuleList) -> bool:
    """Are `blocks` `PackedBlock`s with our attention layer and no stochastic depth (which
    drops per sample, not per token)? A loaded timm teacher's blocks are not."""
    return all(
        isinstance(b, PackedBlock)
        and isinstance(b.attn, BackendAttention)
        and isinstance(b.drop_path1, nn.Identity)
        and isinstance(b.drop_path2, nn.Identity)
        for b in blocks
    )


class PackedBlock(Block):
    """timm's `Block` (same parameters and state-dict keys) whose forward also takes the real
    tokens of a padded [batch, length, D] sequence packed as `x` [len(rows), D], `rows` being
    their flat positions (`run_blocks`)."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rows: torch.Tensor | None = None,
        batch: int = 0,
        length: int = 0,
    ) -> torch.Tensor:
        if rows is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.ls1(self.attn.forward_rows(self.norm1(x), rows, batch, length, attn_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


def key_padding_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean attention mask [B, 1, 1, N] that hides the padding keys of `valid` [B, N].

    `valid` None means nothing is padded: no mask, so the unmasked (fastest) kernels run. The
    caller decides that where the flags live on the CPU (`Trainer._on_device`); checking here
    would wait for the device on every forward."""
    return None if valid is None else valid[:, None, None, :]


def timm_init_mode(init: str) -> str:
    """`model.init` (timm | jax) as timm's `weight_init` mode name."""
    return "" if init == "timm" else init


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [grid*grid, dim] (I-JEPA's choice)."""
    return build_sincos2d_pos_embed([grid, grid], dim=dim)


class Encoder(VisionTransformer):
    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        class_token: bool = False,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        fixed_pos_embed: bool = True,
        attention: str = "sdpa",
        init: str = "timm",
    ):
        # `attention`: sdpa | xformers | auto (auto is resolved per device/dtype on first use);
        # the attention layer keeps timm's parameter names, so state dicts are unchanged.
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=1,
            num_classes=0,
            global_pool="",
            class_token=class_token,
            reg_tokens=reg_tokens,
            no_embed_class=no_embed_class,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path,
            attn_layer=attention_layer(attention),
            block_fn=PackedBlock,
            weight_init=timm_init_mode(init),
        )
        self.attention = attention
        self.grid = img_size // patch_size
        if fixed_pos_embed:
            # A frozen sin-cos table, as in I-JEPA: nothing to learn, and it extrapolates cleanly.
            offset = 0 if no_embed_class else self.num_prefix_tokens
            with torch.no_grad():
                self.pos_embed[:, offset:] = sincos_pos_embed(self.grid, embed_dim)
            self.pos_embed.requires_grad_(False)

    @property
    def width(self) -> int:
        return self.embed_dim

    def forward(
        self, images: torch.Tensor, keep: torch.Tensor | None = None, keep_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-normed patch tokens [B, K, D] of `images` [B, 1, H, W].

        `keep` [B, K] lists the patch positions to encode (the context); None encodes all.
        `keep_valid` [B, K] marks padding in `keep` (False): no token attends to a padding
        token, so a sample's valid tokens do not depend on how far it was padded (None: no
        padding).
        Prefix tokens (class, register) of a loaded timm teacher are used but not returned.
        """
        x = self.patch_embed(images)
        n_prefix = self.num_prefix_tokens
        if self.no_embed_class:
            prefix_pos, patch_pos = None, self.pos_embed
        else:
            prefix_pos, patch_pos = self.pos_embed[:, :n_prefix], self.pos_embed[:, n_prefix:]
        x = x + patch_pos
        if keep is not None:
            x = gather_tokens(x, keep)
        if n_prefix:
            prefix = torch.cat(
                [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None], dim=1
            )
            if prefix_pos is not None:
                prefix = prefix + prefix_pos
            x = torch.cat([prefix, x], dim=1)
        if keep_valid is not None and n_prefix:
            keep_valid = torch.cat([keep_valid.new_ones(keep_valid.shape[0], n_prefix), keep_valid], dim=1)
        x = run_blocks(self.blocks, self.norm_pre(x), self.grad_checkpointing, key_padding_mask(keep_valid), keep_valid)
        return self.norm(x)[:, n_prefix:]


def attention_backend(setting: str, device: torch.device | str | None, dtype: torch.dtype | None = None) -> str:
    """`setting` resolved for `device`/`dtype` when the device is known, else left as is
    (the layers then resolve `auto` on their first forward)."""
    if device is None:
        return setting
    return resolve_backend(setting, torch.device(device), dtype or torch.float32)


def build_encoder(
    cfg: ModelConfig,
    image_size: int,
    *,
    attention: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Encoder:
    """The encoder for `cfg`. Its attention backend is `attention` if given, else
    `cfg.attention` resolved for `device`/`dtype` (explicit xformers that cannot run there
    raises UserError now rather than at the first step)."""
    backend = attention if attention is not None else attention_backend(cfg.attention, device, dtype)
    return Encoder(
        img_size=image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        drop_path=cfg.drop_path,
        attention=backend,
        init=cfg.init,
    )
