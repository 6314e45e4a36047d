"""load_external: checkpoints written by the libraries themselves (timm, MAE-style, open_clip,
BEiT) give the features those libraries compute on the gray image repeated on R, G, B and
normalised the checkpoint's way; what does not fit is one clear line."""

from __future__ import annotations

import argparse
import hashlib
import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import register_model

from usjepa.bench.loaders import load_external
from usjepa.errors import UserError

SIZE = 64
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# Tiny members of timm's real families (its entry points with smaller widths), registered so
# that load_external can name them; 64 px by default, as open_clip builds its timm trunk so.
@register_model
def usjepa_test_vit(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", **{"img_size": SIZE, "embed_dim": 48, "depth": 2, "num_heads": 3, **kwargs}
    )


@register_model
def usjepa_test_vit_wide(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", **{"img_size": SIZE, "embed_dim": 96, "depth": 2, "num_heads": 3, **kwargs}
    )


@register_model
def usjepa_test_clip_vit(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    return timm.create_model(
        "vit_xsmall_patch16_clip_224", **{"img_size": SIZE, "embed_dim": 64, "depth": 2, "num_heads": 2, **kwargs}
    )


@register_model
def usjepa_test_beit(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    return timm.create_model(
        "beit_base_patch16_224", **{"img_size": SIZE, "embed_dim": 48, "depth": 2, "num_heads": 3, **kwargs}
    )


@register_model
def usjepa_test_hybrid(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_r_s16_p8_224", **{"img_size": SIZE, "embed_dim": 48, "depth": 2, "num_heads": 3, **kwargs}
    )


def library_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


@pytest.fixture(scope="module")
def gray() -> torch.Tensor:
    return torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def ours(loaded, g: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.module((g - 0.5) / 0.5)


def rgb(g: torch.Tensor, mean, std) -> torch.Tensor:
    """What the library's own pipeline feeds the model for gray image `g`."""
    m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std))
    return (g.expand(-1, 3, -1, -1) - m) / s


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "model"])
def test_timm_checkpoint_gives_timm_features(tmp_path, gray, pooling):
    lib = library_model("usjepa_test_vit")
    path = tmp_path / "vit.pth"
    torch.save({"model": {f"module.{k}": v for k, v in lib.state_dict().items()}, "step": 7}, path)
    loaded = load_external("timm", path, "usjepa_test_vit", SIZE, pooling=pooling)
    with torch.no_grad():
        tokens = lib.forward_features(rgb(gray, (0.5,) * 3, (0.5,) * 3))  # vit_tiny's pretrained_cfg
        expected = {
            "mean": tokens[:, 1:],
            "cls": tokens[:, :1],
            "model": lib.forward_head(tokens, pre_logits=True)[:, None],
        }[pooling]
    close(ours(loaded, gray), expected)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.module.model.patch_embed.proj.in_channels == 1  # the normalisation folded in
    assert loaded.info == dict(
        kind="timm",
        path=str(path.resolve()),
        model="usjepa_test_vit",
        in_chans=3,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        pooling=pooling,
        image_size=SIZE,
        num_params=sum(p.numel() for p in lib.parameters()),
        step=7,
    )
    assert json.loads(json.dumps(loaded.info)) == loaded.info
    assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())


def test_mae_checkpoint_pools_through_fc_norm(tmp_path, gray):
    # An MAE fine-tune with global pooling: fc_norm, no final norm; plus the pretraining decoder.
    lib = library_model("usjepa_test_vit", global_pool="avg")
    decoder = {
        "decoder_embed.weight": torch.zeros(32, 48),
        "decoder_pos_embed": torch.zeros(1, 17, 32),
        "decoder_blocks.0.norm1.weight": torch.ones(32),
        "mask_token": torch.zeros(1, 1, 32),
    }
    path = tmp_path / "mae.pth"
    torch.save({"model": {**lib.state_dict(), **decoder}, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, path)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tokens = load_external("mae", path, "usjepa_test_vit", SIZE, mean=mean, std=std)
    pooled = load_external("mae", path, "usjepa_test_vit", SIZE, mean=mean, std=std, pooling="model")
    with torch.no_grad():
        raw = lib.forward_features(rgb(gray, mean, std))
        close(ours(tokens, gray), raw[:, 1:])
        close(ours(pooled, gray), lib.forward_head(raw, pre_logits=True)[:, None])
    assert tokens.info["step"] is None


def _tiny_clip(vision: open_clip.CLIPVisionCfg) -> open_clip.CLIP:
    torch.manual_seed(2)
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def test_open_clip_timm_trunk_from_its_config(tmp_path, gray):
    clip = _tiny_clip(open_clip.CLIPVisionCfg(timm_model_name="usjepa_test_vit", timm_pool="", image_size=SIZE))
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), path)
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "usjepa_test_vit"}},
                "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD},
            }
        )
    )
    loaded = load_external("open_clip", path, "", SIZE)
    with torch.no_grad():
        expected = clip.visual.trunk.forward_features(rgb(gray, OPENAI_MEAN, OPENAI_STD))[:, 1:]
    close(ours(loaded, gray), expected)
    assert (loaded.info["model"], loaded.info["mean"]) == ("usjepa_test_vit", list(OPENAI_MEAN))


def test_native_open_clip_vit_gives_its_tokens(tmp_path, gray):
    clip = _tiny_clip(open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=SIZE))
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": clip.state_dict(), "epoch": 1}, path)
    loaded = load_external("open_clip", path, "usjepa_test_clip_vit", SIZE, mean=OPENAI_MEAN, std=OPENAI_STD)
    clip.visual.output_tokens = True
    with torch.no_grad():
        _, expected = clip.visual(rgb(gray, OPENAI_MEAN, OPENAI_STD))
    close(ours(loaded, gray), expected)


def test_beit_checkpoint_with_shared_relative_bias(tmp_path, gray):
    # USFM-style BEiT pretraining: one relative position bias for all blocks, a final norm,
    # and the visual-token head; timm's beit_* builds a table per block and pools via fc_norm.
    lib = library_model("usjepa_test_beit", use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_fc_norm=False)
    torch.nn.init.normal_(lib.rel_pos_bias.relative_position_bias_table)  # timm starts it at zero
    extra = {"mask_token": torch.zeros(1, 1, 48), "lm_head.weight": torch.zeros(8, 48), "lm_head.bias": torch.zeros(8)}
    path = tmp_path / "usfm.pth"
    torch.save({"model": {**lib.state_dict(), **extra}}, path)
    loaded = load_external("beit", path, "usjepa_test_beit", SIZE, mean=(0.5,), std=(0.25,))
    with torch.no_grad():
        expected = lib.forward_features(rgb(gray, (0.5,), (0.25,)))[:, 1:]
    close(ours(loaded, gray), expected)


def test_stem_that_cannot_fold_gets_a_normalising_adapter(tmp_path, gray):
    lib = library_model("usjepa_test_hybrid")  # a ResNet stem (padded convs) before the patch projection
    path = tmp_path / "hybrid.safetensors"
    save_file(lib.state_dict(), str(path))
    loaded = load_external("timm", path, "usjepa_test_hybrid", SIZE)
    with torch.no_grad():
        close(ours(loaded, gray), lib.forward_features(rgb(gray, (0.5,) * 3, (0.5,) * 3))[:, 1:])


def test_gray_checkpoint_keeps_its_one_channel(tmp_path, gray):
    lib = library_model("usjepa_test_vit", in_chans=1)  # e.g. a gray-trained MAE
    path = tmp_path / "gray.pth"
    torch.save(lib.state_dict(), path)
    loaded = load_external("mae", path, "usjepa_test_vit", SIZE)
    assert (loaded.info["in_chans"], loaded.info["mean"], loaded.info["std"]) == (1, [0.5], [0.5])
    with torch.no_grad():
        close(ours(loaded, gray), lib.forward_features((gray - 0.5) / 0.5)[:, 1:])


def test_normalisation_and_step_recorded_beside_the_file(tmp_path, gray):
    lib = library_model("usjepa_test_vit")
    path = tmp_path / "model.safetensors"
    save_file(lib.state_dict(), str(path), metadata={"step": "42"})
    mean, std = [0.2, 0.3, 0.4], [0.1, 0.2, 0.3]
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": "usjepa_test_vit", "pretrained_cfg": {"mean": mean, "std": std}})
    )
    loaded = load_external("timm", path, "usjepa_test_vit", SIZE)
    assert (loaded.info["mean"], loaded.info["std"], loaded.info["step"]) == (mean, std, 42)
    with torch.no_grad():
        close(ours(loaded, gray), lib.forward_features(rgb(gray, mean, std))[:, 1:])


def test_random_init_is_seeded_and_leaves_the_global_rng(gray):
    state = torch.random.get_rng_state()
    a, b, c = (load_external("timm", None, "usjepa_test_vit", SIZE, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    close(ours(a, gray), ours(b, gray))
    assert not torch.allclose(ours(a, gray), ours(c, gray))
    assert (a.sha256, a.info["path"], a.info["step"]) == ("", None, None)


def one_line_error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        load_external(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "beit.pth"
    torch.save(library_model("usjepa_test_beit").state_dict(), path)
    message = one_line_error("timm", path, "usjepa_test_vit", SIZE)
    for needle in (
        str(path),
        "usjepa_test_vit",
        "missing",
        "blocks.0.attn.qkv.bias",
        "unexpected",
        "blocks.0.attn.q_bias",
        "blocks.0.gamma_1",
        "set model:",
    ):
        assert needle in message


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(library_model("usjepa_test_vit").state_dict(), path)
    message = one_line_error("timm", path, "usjepa_test_vit_wide", SIZE)
    assert "cls_token is [1, 1, 48] in the file but [1, 1, 96]" in message and str(path) in message


def test_mistakes_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"certainly not a checkpoint")
    text_only = tmp_path / "text.pth"
    torch.save({"text.token_embedding.weight": torch.zeros(4, 2)}, text_only)
    cases = [
        (("timm", tmp_path / "nope.pth", "usjepa_test_vit", SIZE), {}, "no such checkpoint file"),
        (("dino", None, "usjepa_test_vit", SIZE), {}, "unknown checkpoint kind"),
        (("timm", garbage, "usjepa_test_vit", SIZE), {}, "not a readable checkpoint"),
        (("open_clip", text_only, "usjepa_test_vit", SIZE), {}, "no vision tower"),
        (("timm", None, "usjepa_test_vit", SIZE), {"pooling": "max"}, "pooling"),
        (("timm", None, "vit_tiny_patch16_224x", SIZE), {}, "did you mean vit_tiny_patch16_224"),
        (("timm", None, "", SIZE), {}, "set model:"),
        (("open_clip", None, "", SIZE), {}, "open_clip_config.json"),
    ]
    for args, kwargs, needle in cases:
        assert needle in one_line_error(*args, **kwargs), args
