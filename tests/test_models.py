import pytest
import timm
import torch
from safetensors.torch import save_file

from usjepa.config import load_config
from usjepa.errors import UserError
from usjepa.models.predictor import Predictor
from usjepa.models.teacher import load_teacher
from usjepa.models.vit import Encoder


def tiny_encoder(**kw):
    return Encoder(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, **kw)


def test_encoder_on_a_subset_equals_full_forward_when_keeping_everything():
    enc = tiny_encoder().eval()
    x = torch.randn(2, 1, 32, 32)
    keep = torch.arange(16).expand(2, -1)
    assert torch.allclose(enc(x), enc(x, keep), atol=1e-6)
    assert enc(x, keep[:, :5]).shape == (2, 5, 48)


def test_encoder_weights_load_into_timm():
    enc = tiny_encoder()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                            depth=2, num_heads=3, in_chans=1, num_classes=0, global_pool="", class_token=False)
    ref.load_state_dict(enc.state_dict())
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(ref.eval().forward_features(x), enc.eval()(x), atol=1e-5)


def test_predictor_output_shape_and_no_cross_block_leak():
    pred = Predictor(in_dim=48, out_dim=7, grid=4, embed_dim=32, depth=1, num_heads=2).eval()
    ctx = torch.randn(2, 6, 48)
    ctx_idx = torch.arange(6).expand(2, -1)
    targets = torch.tensor([[[8, 9], [8, 9]], [[14, 15], [14, 15]]])  # T=2, B=2, Kt=2
    out = pred(ctx, ctx_idx, targets)
    assert out.shape == (4, 2, 7)
    # Predicting block 0 alone gives the same result: blocks do not see each other's mask tokens.
    alone = pred(ctx, ctx_idx, targets[:1])
    assert torch.allclose(out[:2], alone, atol=1e-6)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_teacher_from_a_timm_rgb_state_dict_matches_timm(tmp_path, suffix):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()  # RGB, class token, 14x14
    path = tmp_path / f"teacher{suffix}"
    if suffix == ".pth":
        torch.save({"model": ref.state_dict()}, path)
    else:
        save_file(ref.state_dict(), str(path))
    cfg = load_config(None, [f"teacher.checkpoint={path}", "data.image_size=224", "teacher.num_heads=3",
                             "teacher.dtype=fp32"])
    teacher, info = load_teacher(cfg, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert info.embed_dim == 192 and len(info.sha256) == 64
    x = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        # A gray image repeated on R, G, B is what the folded one-channel embedding sees.
        expected = ref.forward_features(x.expand(-1, 3, -1, -1))[:, 1:]
        assert torch.allclose(teacher(x), expected, atol=1e-4)


def test_teacher_position_embedding_is_resampled_and_bf16_by_default(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "t.pth"
    torch.save(ref.state_dict(), path)
    cfg = load_config(None, [f"teacher.checkpoint={path}", "data.image_size=64", "teacher.num_heads=3"])
    teacher, info = load_teacher(cfg, torch.device("cpu"))
    assert teacher.pos_embed.shape == (1, 1 + 16, 192)
    assert info.dtype == "bfloat16"
    with torch.inference_mode():
        assert teacher(torch.randn(1, 1, 64, 64).bfloat16()).shape == (1, 16, 192)


def test_teacher_errors_are_one_line_hints(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "t.pth"
    torch.save(ref.state_dict(), path)
    with pytest.raises(UserError, match="patch size 16 != model.patch_size 8"):
        load_teacher(load_config(None, [f"teacher.checkpoint={path}", "model.patch_size=8", "data.image_size=64"]),
                     torch.device("cpu"))
    with pytest.raises(UserError, match="not a stage-1 run dir"):
        load_teacher(load_config(None, [f"teacher.checkpoint={tmp_path / 'missing.pth'}"]), torch.device("cpu"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(UserError, match="not a timm-style ViT state dict"):
        load_teacher(load_config(None, [f"teacher.checkpoint={tmp_path / 'junk.pth'}"]), torch.device("cpu"))
