"""Attention backend selection (`model.attention: auto | sdpa | xformers | matmul`) and the attention layer.

`BackendAttention` is timm's `Attention` with a different kernel call: the parameters (qkv,
proj, q_norm, k_norm, norm, gate) and therefore the state-dict keys are timm's own, so timm
weights load unchanged. The forward runs either torch's `scaled_dot_product_attention`
(SDPA, tensors [B, H, N, D]), xformers' `memory_efficient_attention` ([B, N, H, D]), or
attention spelled out as two matmuls and a softmax (`matmul`).

xformers is used only when it imports, the tensors live on a CUDA device, and a one-time
start-up check (xformers vs SDPA on a small random input, per device and dtype) agrees.
`auto` otherwise falls back to SDPA and says why once (logging, and `explain_backend`);
an explicit `xformers` that cannot run is a `UserError`. On the CPU in bf16, `auto` takes
`matmul`: at ViT sequence lengths (a few hundred tokens) the fused CPU kernel is slower than
plain matmuls (ViT-S/16 blocks, 224 px, forward + backward: 811 vs 711 ms; in fp32 the two
are even, and SDPA is kept).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention

from usjepa.errors import UserError

log = logging.getLogger(__name__)

SETTINGS = ("auto", "sdpa", "xformers", "matmul")
_FIX = "install it with `pip install -e '.[gpu]'` on a CUDA machine, or set model.attention=sdpa"

# Start-up check tolerances: bf16 keeps 8 mantissa bits (eps ~ 4e-3) and the two kernels
# accumulate in different orders, so outputs of magnitude ~1 may differ by a few eps.
_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Resolution:
    backend: str  # "sdpa" | "xformers" | "matmul"
    reason: str  # why this backend, in words (empty when it is simply what was asked for)


# ----------------------------------------------------------------------------- availability


@functools.lru_cache(maxsize=1)
def _import_xformers() -> tuple[object | None, str]:
    """(xformers.ops module or None, why not)."""
    try:
        import xformers.ops as xops  # optional dependency
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken build raising at import time
        first = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        return None, f"xformers is not importable ({type(e).__name__}: {first})"
    if not hasattr(xops, "memory_efficient_attention"):
        return None, "xformers.ops has no memory_efficient_attention (too old a version?)"
    return xops, ""


def _normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


_CHECKS: dict[tuple[torch.device, torch.dtype], tuple[bool, str]] = {}


def _startup_check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Does xformers agree with SDPA on `device` in `dtype`? Cached per (device, dtype)."""
    key = (device, dtype)
    if key in _CHECKS:
        return _CHECKS[key]
    xops, _ = _import_xformers()
    tol = _TOLERANCE.get(dtype, 2e-2)
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(2, 77, 4, 32, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            got = xops.memory_efficient_attention(q, k, v)  # [B, N, H, D]
            want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
                1, 2
            )
        err = (got.float() - want.float()).abs().max().item()
        ok = bool(torch.allclose(got.float(), want.float(), atol=tol, rtol=tol))
        verdict = (
            ok,
            "" if ok else f"xformers disagrees with SDPA on {device} in {dtype} (max abs diff {err:.2e} > {tol:g})",
        )
    except Exception as e:  # noqa: BLE001 - no kernel for this GPU/dtype, CUDA error: fall back
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        verdict = (False, f"xformers failed its start-up check on {device} in {dtype}: {first}")
    _CHECKS[key] = verdict
    return verdict


# ----------------------------------------------------------------------------- resolution

_SAID: set[tuple[str, torch.device, torch.dtype]] = set()


def explain_backend(setting: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Resolution:
    """Which backend `setting` gives on `device`/`dtype`, and why. Raises UserError for an
    explicit `xformers` that cannot run; never raises for `auto` or `sdpa`."""
    if setting not in SETTINGS:
        raise UserError(f"model.attention={setting}: not one of {', '.join(SETTINGS)}")
    device = _normalize_device(device)
    if setting in ("sdpa", "matmul"):
        return Resolution(setting, "")
    if setting == "auto" and device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return Resolution(
            "matmul",
            f"model.attention=auto uses matmul on cpu in {dtype}: faster than the fused "
            "CPU kernel at ViT sequence lengths",
        )
    xops, why_not = _import_xformers()
    if xops is not None and device.type != "cuda":
        why_not = f"xformers needs a CUDA device, this is {device.type}"
    if xops is not None and device.type == "cuda":
        ok, why_not = _startup_check(device, dtype)
        if ok:
            return Resolution(
                "xformers",
                "" if setting == "xformers" else f"xformers passed its start-up check on {device} in {dtype}",
            )
    if setting == "xformers":
        raise UserError(f"model.attention=xformers cannot run: {why_not}; {_FIX}")
    return Resolution("sdpa", f"model.attention=auto uses sdpa: {why_not}")


def resolve_backend(setting: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """ "sdpa", "xformers" or "matmul" for `setting` (auto | sdpa | xformers | matmul) on
    `device` in `dtype`.

    `auto` falls back to sdpa and logs why, once per (setting, device, dtype); an explicit
    `xformers` that cannot run raises UserError (one line: what, why, how to fix).
    """
    res = explain_backend(setting, device, dtype)
    key = (setting, _normalize_device(device), dtype)
    if res.reason and key not in _SAID:
        _SAID.add(key)
        # A fallback on a CUDA device costs speed the user may expect; on CPU it is the norm.
        failed_check = "start-up check" in res.reason and res.backend == "sdpa"
        log.log(logging.WARNING if failed_check else logging.INFO, res.reason)
    return res.backend


# ----------------------------------------------------------------------------- the layer


def matmul_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale) v on [B, H, N, D], attending where the boolean `attn_mask` is
    True: what SDPA computes, as plain matmuls."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if is_causal:
        n = attn.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=attn.device).tril()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None:
        # An additive bias, added in place: one pass over the scores, none in the backward
        # (masked_fill copies them, and its backward masks the gradient in another pass), and
        # the bias is the mask's size, not the scores' (no head axis). ViT-S SALT step, bf16:
        # about 4% faster here.
        bias = torch.zeros(attn_mask.shape, dtype=attn.dtype, device=attn.device)
        attn = attn.add_(bias.masked_fill_(~attn_mask, float("-inf")))
    attn = attn.softmax(-1)
    if dropout:
        attn = F.dropout(attn, dropout)
    return attn @ v


class BackendAttention(Attention):
    """timm's `Attention` (same parameters, same state-dict keys) with a selectable kernel.

    `backend` is a setting: "sdpa" and "xformers" are fixed; "auto" is resolved on the first
    forward for the device and dtype of the actual q/k/v (so autocast is taken into account)
    and cached. Use `attention_layer(backend)` to get a class for timm's `attn_layer=`.
    """

    backend: str = "sdpa"

    def __init__(self, dim: int, *args, backend: str | None = None, **kwargs) -> None:
        super().__init__(dim, *args, **kwargs)
        if backend is not None:
            self.backend = backend
        if self.backend not in SETTINGS:
            raise UserError(f"model.attention={self.backend}: not one of {', '.join(SETTINGS)}")
        self._resolved: dict[tuple[torch.device, torch.dtype], str] = {}

    def extra_repr(self) -> str:
        return f"backend={self.backend}"

    def _kernel(self, q: torch.Tensor) -> str:
        if self.backend in ("sdpa", "matmul"):
            return self.backend
        key = (q.device, q.dtype)
        kernel = self._resolved.get(key)
        if kernel is None:
            kernel = self._resolved[key] = resolve_backend(self.backend, q.device, q.dtype)
        return kernel

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        return self._project(
            self._attend(self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim), attn_mask, is_causal), x
        )

    def forward_rows(
        self, x: torch.Tensor, rows: torch.Tensor, batch: int, length: int, attn_mask: torch.Tensor
    ) -> torch.Tensor:
        """`forward` of a [batch, length, D] sequence of which only the flat positions `rows`
        are real, given as packed tokens `x` [len(rows), D]; returns the packed outputs. The
        projections run on the real tokens only; the kernel sees them padded, and `attn_mask`
        must hide the padding keys (zeros here)."""
        qkv = self.qkv(x)
        padded = qkv.new_zeros(batch * length, qkv.shape[-1]).index_copy(0, rows, qkv)
        mixed = self._attend(padded.view(batch, length, 3, self.num_heads, self.head_dim), attn_mask, False)
        return self._project(mixed.reshape(batch * length, self.attn_dim).index_select(0, rows), x)

    def _attend(self, qkv: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """qkv [B, N, 3, H, D] -> the heads' attention outputs, concatenated [B, N, H*D]."""
        B, N = qkv.shape[:2]
        dropout = self.attn_drop.p if self.training else 0.0
        kernel = self._kernel(qkv)
        # Masks go through SDPA: xformers wants its own bias types and none is used here.
        if attn_mask is None and kernel == "xformers":
            import xformers.ops as xops  # resolved above, so it imports

            q, k, v = qkv.unbind(2)  # [B, N, H, D] each
            q, k = self.q_norm(q), self.k_norm(k)  # norms act on the last (head_dim) axis
            bias = xops.LowerTriangularMask() if is_causal else None
            x = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout, scale=self.scale)
            return x.reshape(B, N, self.attn_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] each
        q, k = self.q_norm(q), self.k_norm(k)
        if kernel == "matmul":
            x = matmul_attention(q, k, v, attn_mask, dropout, is_causal, self.scale)
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale
            )
        return x.transpose(1, 2).reshape(B, N, self.attn_dim)

    def _project(self, mixed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output projection of the mixed heads (token-wise), gated by the input `x` where
        the layer has a gate."""
        gate = getattr(self, "gate", None)
        mixed = self.norm(mixed)
        if gate is not None:
            mixed = mixed * gate(x).sigmoid()
        return self.proj_drop(self.proj(mixed))


class SdpaAttention(BackendAttention):
    backend = "sdpa"


class XformersAttention(BackendAttention):
    backend = "xformers"


class AutoAttention(BackendAttention):
    backend = "auto"


class MatmulAttention(BackendAttention):
    backend = "matmul"


_LAYERS = {"sdpa": SdpaAttention, "xformers": XformersAttention, "auto": AutoAttention, "matmul": MatmulAttention}


def attention_layer(backend: str = "sdpa") -> type[BackendAttention]:
    """The `BackendAttention` class bound to `backend`, for timm's `attn_layer=` argument.

    A class rather than a functools.partial, because timm's block factory calls issubclass()
    on it; module-level classes, so models still pickle.
    """
    if backend not in _LAYERS:
        raise UserError(f"model.attention={backend}: not one of {', '.join(SETTINGS)}")
    return _LAYERS[backend]
