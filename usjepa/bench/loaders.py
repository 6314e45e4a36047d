"""Other people's encoder checkpoints as frozen feature encoders for gray ultrasound.

`load_external(kind, path, model, image_size)` builds the timm architecture `model`, loads the
checkpoint file `path` into it (or seeds a random init where `path` is empty) and wraps it so
that it takes our gray input ((g - 0.5) / 0.5, one channel) and returns tokens [B, N, D].

A kind names the layout the file comes in; timm's own converters do the renaming:
- timm: a timm state dict (also DINOv2, I-JEPA, DeiT: timm's ViT converter knows them);
- mae: an MAE checkpoint; its pixel decoder and mask token are dropped;
- open_clip: an open_clip checkpoint, of which only the vision tower is kept: a timm trunk
  (`visual.trunk.*`, e.g. BiomedCLIP) as it is, a native CLIP ViT (`visual.conv1.weight`,
  `visual.transformer.resblocks.*`) through timm's OpenAI CLIP converter;
- beit: a BEiT (e.g. USFM) checkpoint; its visual-token head and mask token are dropped and a
  shared relative position bias is copied into every block, as BEiT fine-tuning does.

Checkpoints of models that pool through `fc_norm` (MAE and BEiT fine-tunes with global average
pooling) have no final per-token norm; their tokens are the last block's output as timm's
`forward_features` gives them for that layout, unnormalised. fc_norm was trained on the pooled
token: applied to each token it would be a normalisation the model never used, whereas the
mean of the raw tokens is exactly what it normalised (pooling "model" returns fc_norm(mean)).
The project's teacher loads such checkpoints the same way.

The backbone's input normalisation is folded into its patch embedding where that is exact (a
ViT patch embedding sees each pixel once, without padding), so the module takes one channel;
other stems get the gray image repeated on their channels and normalised in front.
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from torch import nn

from usjepa.data.augment import PIXEL_MEAN, PIXEL_STD
from usjepa.errors import UserError
from usjepa.fileio import files_sha256
from usjepa.models.loading import (
    check_normalisation,
    fold_input_normalisation,
    read_checkpoint,
    recorded_normalisation,
    strip_prefix,
)

EXTERNAL_KINDS = ("timm", "open_clip", "mae", "beit")
POOLINGS = ("mean", "cls", "model")
DEFAULT_MODELS = {"mae": "vit_base_patch16_224", "beit": "beit_base_patch16_224"}
# Parts only pretraining uses: MAE's pixel decoder and mask token, BEiT's visual-token head.
_PRETRAINING_ONLY = {"mae": ("decoder_", "mask_token"), "beit": ("lm_head.", "mask_token")}
_SHARED_BIAS = "rel_pos_bias.relative_position_bias_table"
_SHOWN = 4  # keys an error lists of each sort


@dataclass(frozen=True)
class LoadedEncoder:
    module: torch.nn.Module  # eval mode, frozen: images [B, 1, S, S] as (g - 0.5) / 0.5 -> tokens [B, N, D]
    sha256: str  # of the checkpoint file; "" for random weights
    # JSON-ready provenance: kind, path, model (timm name), in_chans, mean, std, pooling,
    # image_size, num_params (the architecture's), step (if the checkpoint records one, else None)
    info: dict


class GrayTokens(nn.Module):
    """Our gray input -> the tokens of timm model `model`.

    `scale` and `shift` ([1, C, 1, 1]) turn our one channel into the C channels the model was
    trained on, normalised its way; None where that map is folded into the patch embedding."""

    def __init__(
        self, model: nn.Module, pooling: str, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ):
        super().__init__()
        self.model, self.pooling = model, pooling
        self.prefix = getattr(model, "num_prefix_tokens", 0)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images if self.scale is None else images * self.scale + self.shift
        tokens = self.model.forward_features(x)
        if self.pooling == "mean":
            return tokens[:, self.prefix :]
        if self.pooling == "cls":
            return tokens[:, :1]
        return self.model.forward_head(tokens, pre_logits=True).unsqueeze(1)


def _vision_tower(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The image encoder of an open_clip checkpoint, without its projection into the joint space."""
    trunk = strip_prefix(sd, "visual.trunk.")
    if trunk:
        return trunk
    # Native layout: timm's ViT converter recognises it by the `visual.` keys and renames them.
    tower = {k: v for k, v in sd.items() if k.startswith("visual.") and k != "visual.proj"}
    if not tower:
        raise UserError(
            f"{path}: no vision tower (no 'visual.' keys, first keys: {', '.join(list(sd)[:3])}); "
            "an open_clip checkpoint holds the model's state dict (open_clip_pytorch_model.bin)"
        )
    return tower


def _select(kind: str, sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The encoder's entries of a `kind` checkpoint."""
    if kind == "open_clip":
        return _vision_tower(sd, path)
    drop = _PRETRAINING_ONLY.get(kind, ())
    return {k: v for k, v in sd.items() if not k.startswith(drop)}


def _open_clip_model(path: Path | None) -> str:
    config = path.with_name("open_clip_config.json") if path else None
    if config is None or not config.is_file():
        return ""
    try:
        vision = json.loads(config.read_text())["model_cfg"]["vision_cfg"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(
            f"{config}: not a readable open_clip config (no model_cfg.vision_cfg: {e}); fix or remove it, or set model:"
        ) from None
    return vision.get("timm_model_name") or ""


def _architecture(kind: str, model: str, path: Path | None) -> str:
    name = model or DEFAULT_MODELS.get(kind, "") or (_open_clip_model(path) if kind == "open_clip" else "")
    if not name:
        where = f"{path}: " if path else ""
        hint = "" if kind != "open_clip" else " (no open_clip_config.json with a timm_model_name beside the file)"
        raise UserError(
            f"{where}a {kind} backbone needs its timm architecture{hint}; set model: e.g. vit_base_patch16_224"
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UserError(
            f"model: {name} is not a timm architecture; "
            + (f"did you mean {', '.join(close)}?" if close else "see timm.list_models()")
        )
    return name


def _create(name: str, image_size: int, in_chans: int = 3) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, in_chans=in_chans)
    except TypeError as e:
        raise UserError(
            f"model: {name} cannot be built at img_size={image_size} ({e}); the bench loads ViT-style "
            "timm models whose forward_features returns tokens"
        ) from None


def _copy_shared_bias(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A shared relative position bias (BEiT pretraining) as each block's own, for a model
    without the shared one: adding one table in every block is what sharing it means."""
    if _SHARED_BIAS not in sd or getattr(model, "rel_pos_bias", True) is not None:
        return sd
    shared = sd[_SHARED_BIAS]
    sd = {k: v for k, v in sd.items() if not k.startswith("rel_pos_bias.")}
    for i in range(len(model.blocks)):
        sd.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared)
    return sd


def _convert(sd: dict[str, torch.Tensor], model: nn.Module, where: str, name: str) -> dict[str, torch.Tensor]:
    """`sd` in `model`'s layout, by the converter of its timm family (renames, pos-embed and
    relative-bias resampling), without the classifier our num_classes=0 model lacks."""
    family = sys.modules[type(model).__module__]
    convert = getattr(family, "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            sd = convert(sd, model)
        except (RuntimeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise UserError(
                f"{where}: timm's {family.__name__} converter cannot read it for {name} ({e}); set model: "
                "to the checkpoint's architecture"
            ) from None
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    wanted = model.state_dict()
    return {k: v for k, v in sd.items() if k in wanted or not (heads and k.startswith(heads))}


def _in_chans(sd: dict[str, torch.Tensor], model: nn.Module) -> int:
    first = f"{model.pretrained_cfg.get('first_conv') or 'patch_embed.proj'}.weight"
    weight = sd.get(first)
    return weight.shape[1] if weight is not None and weight.ndim == 4 else 3


def _match_final_norm(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Give `model` the final-norm layout of checkpoint `sd`: after pooling (fc_norm) or per
    token (norm). timm's ViT and BEiT swap these two same-shaped norms for fc_norm /
    use_fc_norm, so swapping the modules is that flag; and as timm does by default, fc_norm
    goes with average pooling, the per-token norm with the class token where there is one."""
    if not (hasattr(model, "norm") and hasattr(model, "fc_norm")):
        return
    has_norm, has_fc_norm = "norm.weight" in sd, "fc_norm.weight" in sd
    if has_norm == has_fc_norm or has_fc_norm == (not isinstance(model.fc_norm, nn.Identity)):
        return
    model.norm, model.fc_norm = model.fc_norm, model.norm
    if has_fc_norm or getattr(model, "cls_token", None) is not None:
        model.reset_classifier(0, global_pool="avg" if has_fc_norm else "token")


def _listing(what: str, keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return f"{len(keys)} {what} ({', '.join(keys[:_SHOWN])}{more})"


def _check_fit(sd: dict[str, torch.Tensor], model: nn.Module, where: str, name: str) -> None:
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in sd]
    unexpected = [k for k in sd if k not in wanted]
    fix = "set model: to the checkpoint's architecture (or kind: to its layout)"
    if missing or unexpected:
        raise UserError(
            f"{where}: does not fit timm {name}: {_listing('missing', missing)}, "
            f"{_listing('unexpected', unexpected)}; {fix}"
        )
    wrong = [k for k in wanted if sd[k].shape != wanted[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"{where}: {k} is {list(sd[k].shape)} in the file but {list(wanted[k].shape)} in timm "
            f"{name} ({len(wrong)} entries differ in shape); {fix}"
        )


def _loaded(sd: dict[str, torch.Tensor], name: str, image_size: int, where: str) -> nn.Module:
    """timm `name` with the weights of `sd` (any layout timm converts), or a UserError saying
    what does not fit."""
    model = _create(name, image_size)
    sd = _convert(_copy_shared_bias(sd, model), model, where, name)
    if (channels := _in_chans(sd, model)) != _in_chans(model.state_dict(), model):
        model = _create(name, image_size, channels)
    _match_final_norm(model, sd)
    _check_fit(sd, model, where, name)
    model.load_state_dict(sd)
    return model


def _normalisation(
    mean: tuple[float, ...], std: tuple[float, ...], path: Path | None, model: nn.Module, in_chans: int, where: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation the backbone was trained with: given, else recorded beside the
    file, else its architecture's pretrained_cfg, else ImageNet's (RGB) or ours (gray)."""
    check_normalisation(mean, std, in_chans, where)
    cfg = model.pretrained_cfg
    if not mean:
        recorded = recorded_normalisation(path) if path else None
        fallback = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if in_chans == 3 else ((PIXEL_MEAN,), (PIXEL_STD,))
        fits = len(cfg.get("mean") or ()) == in_chans and len(cfg.get("std") or ()) == in_chans
        mean, std = recorded or ((cfg["mean"], cfg["std"]) if fits else fallback)
    check_normalisation(mean, std, in_chans, where)
    return tuple(map(float, mean)), tuple(map(float, std))


def _fold_into_patch_embed(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> bool:
    """Fold the map from our input to the model's normalised channels into its patch embedding,
    where that is exact (the stem is a conv that sees each pixel once, without padding, so the
    shift becomes a bias); the model then takes one channel."""
    embed = getattr(model, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if not (
        isinstance(embed, PatchEmbed)
        and isinstance(proj, nn.Conv2d)
        and not embed.dynamic_img_pad
        and proj.kernel_size == proj.stride
        and proj.padding == (0, 0)
        and proj.groups == 1
    ):
        return False
    bias = proj.bias if proj.bias is not None else proj.weight.new_zeros(proj.out_channels)  # CLIP has none
    weight, bias = fold_input_normalisation(proj.weight.detach(), bias.detach(), mean, std)
    folded = nn.Conv2d(1, proj.out_channels, proj.kernel_size, proj.stride)
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    embed.proj = folded
    return True


def _gray_input(
    model: nn.Module, pooling: str, mean: tuple[float, ...], std: tuple[float, ...], in_chans: int
) -> GrayTokens:
    if _fold_into_patch_embed(model, mean, std):
        return GrayTokens(model, pooling)
    # g = x * PIXEL_STD + PIXEL_MEAN reaches channel c as (g - mean_c) / std_c.
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32).expand(in_chans).reshape(1, -1, 1, 1) for v in (mean, std))
    return GrayTokens(model, pooling, PIXEL_STD / std_t, (PIXEL_MEAN - mean_t) / std_t)


def _checked_path(path: str | Path | None) -> Path | None:
    if not path:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the checkpoint file in it (e.g. {path}/model.safetensors)")
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; check the path")
    return path


def load_external(
    kind: str,
    path: str | Path | None,
    model: str,
    image_size: int,
    *,
    mean: tuple[float, ...] = (),
    std: tuple[float, ...] = (),
    pooling: str = "mean",
    seed: int = 0,
) -> LoadedEncoder:
    """Checkpoint file `path` of layout `kind` in timm architecture `model` (its default for
    mae, beit and open_clip when ""), as a frozen encoder of our gray `image_size` px input.
    `path` empty: the architecture with random weights drawn from `seed` (global RNG untouched).
    `pooling`: mean (the patch tokens), cls (the class token) or model (timm's own pooled
    pre-logits), the latter two as one token."""
    if kind not in EXTERNAL_KINDS:
        raise UserError(f"unknown checkpoint kind '{kind}'; choose one of {', '.join(EXTERNAL_KINDS)}")
    if pooling not in POOLINGS:
        raise UserError(f"pooling: '{pooling}' is not one of {', '.join(POOLINGS)}")
    file = _checked_path(path)
    name = _architecture(kind, model, file)
    # Building modules draws initial weights: from `seed`, whether or not a checkpoint replaces them.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if file is None:
            net, step, digest = _create(name, image_size), None, ""
        else:
            sd, step = read_checkpoint(file)
            net, digest = _loaded(_select(kind, sd, file), name, image_size, f"{file} ({kind})"), files_sha256([file])
        if pooling == "cls" and getattr(net, "cls_token", None) is None:
            raise UserError(f"pooling: cls, but timm {name} has no class token; use pooling: mean")
        in_chans = _in_chans(net.state_dict(), net)
        num_params = sum(p.numel() for p in net.parameters())  # the architecture's, before folding
        mean, std = _normalisation(tuple(mean), tuple(std), file, net, in_chans, str(file) if file else f"timm {name}")
        module = _gray_input(net, pooling, mean, std, in_chans).eval().requires_grad_(False)
    info = dict(
        kind=kind,
        path=str(file.resolve()) if file else None,
        model=name,
        in_chans=in_chans,
        mean=list(mean),
        std=list(std),
        pooling=pooling,
        image_size=image_size,
        num_params=num_params,
        step=step,
    )
    return LoadedEncoder(module=module, sha256=digest, info=info)
