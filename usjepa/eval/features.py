"""Frozen-encoder feature extraction for the probes (docs/method.md#probe-protocol), and the train-split
standardiser the linear and kNN probes share.

The probes see one vector per image: the mean over the encoder's last-layer tokens. A JEPA
ViT has no trained CLS token, so mean pooling is the default the paper leaves implicit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import torch

from usjepa.errors import UserError

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` when it is a low-precision type the device can run; fp32 otherwise."""
    if dtype not in _LOW_PRECISION:
        return contextlib.nullcontext()
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train mean and population std per feature (float64); a constant feature gets std 1."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    std = x64.std(axis=0)
    std[std < 1e-12] = 1.0
    return mean, std


def standardized(x: np.ndarray, mean: np.ndarray | float, std: np.ndarray | float) -> np.ndarray:
    """(x - mean) / std computed in float64, returned as float32."""
    return ((x.astype(np.float64) - mean) / std).astype(np.float32)


def _check_encoder_device(encoder: torch.nn.Module, device: torch.device) -> None:
    param = next(encoder.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise UserError(
            f"extract_features: the encoder is on {param.device} but features were requested "
            f"on {device}; move it first with encoder.to({str(device)!r})"
        )


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    progress: bool = False,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Frozen encoder -> mean-pooled last-layer tokens, in input order.

    `batches` yields (images [B, 1, H, W] float, labels [B] int) in a fixed order; it is
    consumed once and never shuffled here. `encoder(images)` must return tokens [B, N, D]
    (already final-normed). The encoder must already sit on `device`; it runs in eval mode
    under torch.inference_mode() and is put back into its previous train/eval mode after.
    With dtype bf16 (or fp16) the forward runs under autocast where the device supports it;
    pooling is done in fp32 either way.

    Returns (features float32 [N_total, D], labels int64 [N_total]). No batches -> arrays of
    shape (0, 0) and (0,).
    """
    device = torch.device(device)
    _check_encoder_device(encoder, device)
    was_training = encoder.training
    encoder.eval()

    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, leave=False, unit="batch")

    feats: list[torch.Tensor] = []  # kept on `device`, copied to host once at the end
    labels: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for images, y in it:
                images = images.to(device=device, dtype=torch.float32, non_blocking=True)
                with _autocast(device, dtype):
                    tokens = encoder(images)
                if tokens.ndim != 3 or tokens.shape[0] != images.shape[0]:
                    raise UserError(
                        f"extract_features: the encoder returned shape {tuple(tokens.shape)} for "
                        f"{images.shape[0]} images; expected tokens [B, N, D]"
                    )
                y = torch.as_tensor(y).reshape(-1)
                if y.shape[0] != images.shape[0]:
                    raise UserError(f"extract_features: a batch has {images.shape[0]} images but {y.shape[0]} labels")
                feats.append(tokens.float().mean(dim=1))
                labels.append(y.to(device="cpu", dtype=torch.int64))
    finally:
        encoder.train(was_training)

    if not feats:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    features = torch.cat(feats).cpu().numpy().astype(np.float32, copy=False)
    return features, torch.cat(labels).numpy()
