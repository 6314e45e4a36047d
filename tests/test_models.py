import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from usjepa.config import load_config
from usjepa.data.augment import to_model_input
from usjepa.errors import UserError
from usjepa.models.predictor import Predictor
from usjepa.models.teacher import load_teacher
from usjepa.models.vit import Encoder, packable, run_blocks, sincos_pos_embed


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
    ref = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        in_chans=1,
        num_classes=0,
        global_pool="",
        class_token=False,
    )
    ref.load_state_dict(enc.state_dict())
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(ref.eval().forward_features(x), enc.eval()(x), atol=1e-5)


def test_encoder_padding_changes_nothing_a_valid_token_sees():
    enc = tiny_encoder(class_token=True).eval()
    x = torch.randn(2, 1, 32, 32)
    keep = torch.tensor([[3, 7, 1, 12, 5], [9, 0, 2, 14, 6]])  # not in order: positions must map
    padded = torch.cat([keep, torch.tensor([[3, 3, 3], [9, 9, 9]])], dim=1)
    valid = torch.arange(8) < 5
    out = enc(x, padded, valid.expand(2, -1))
    torch.testing.assert_close(out[:, :5], enc(x, keep), atol=1e-5, rtol=1e-5)
    # Sample 0 padded in a batch equals sample 0 alone with its real length.
    lengths = torch.tensor([5, 3])
    out = enc(x, keep, torch.arange(5) < lengths[:, None])
    torch.testing.assert_close(out[1, :3], enc(x[1:], keep[1:, :3])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["per_block", "shared_context"])
def test_predictor_blocks_do_not_see_each_other(layout):
    torch.manual_seed(0)
    pred = Predictor(in_dim=48, out_dim=7, grid=4, embed_dim=32, depth=2, num_heads=2, layout=layout).eval()
    ctx = torch.randn(2, 6, 48)
    ctx_idx = torch.tensor([[0, 5, 2, 3, 10, 1], [4, 6, 7, 11, 12, 13]])
    targets = torch.tensor([[[8, 9], [2, 3]], [[14, 15], [0, 1]]])  # T=2, B=2, Kt=2
    out = pred(ctx, ctx_idx, targets)
    assert out.shape == (4, 2, 7)
    # Block 1 at other positions: block 0's predictions do not move; block 1's do.
    moved = targets.clone()
    moved[1] = torch.tensor([[4, 5], [8, 10]])
    again = pred(ctx, ctx_idx, moved)
    torch.testing.assert_close(again[:2], out[:2], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(again[2:], out[2:], atol=1e-3)
    # Block 0 alone gives the same predictions.
    torch.testing.assert_close(pred(ctx, ctx_idx, targets[:1]), out[:2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", ["per_block", "shared_context"])
def test_predictor_padding_changes_no_prediction(layout):
    torch.manual_seed(0)
    pred = Predictor(in_dim=48, out_dim=7, grid=4, embed_dim=32, depth=2, num_heads=2, layout=layout).eval()
    ctx, ctx_idx = torch.randn(1, 5, 48), torch.tensor([[0, 5, 2, 3, 10]])
    targets = torch.tensor([[[8, 9, 12]], [[14, 15, 11]]])
    want = pred(ctx, ctx_idx, targets)
    # Two padding context tokens and one padding token per block, with garbage features.
    ctx_p = torch.cat([ctx, torch.randn(1, 2, 48)], dim=1)
    ctx_idx_p = torch.cat([ctx_idx, torch.tensor([[7, 7]])], dim=1)
    targets_p = torch.cat([targets, torch.tensor([[[1]], [[1]]])], dim=2)
    ctx_valid = torch.tensor([[True] * 5 + [False] * 2])
    target_valid = torch.tensor([[[True] * 3 + [False]]] * 2)
    got = pred(ctx_p, ctx_idx_p, targets_p, ctx_valid, target_valid)
    torch.testing.assert_close(got[:, :3], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_teacher_from_a_timm_rgb_state_dict_matches_timm(tmp_path, suffix):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()  # RGB, class token, 14x14
    path = tmp_path / f"teacher{suffix}"
    if suffix == ".pth":
        torch.save({"model": ref.state_dict()}, path)
    else:
        save_file(ref.state_dict(), str(path))
    cfg = load_config(
        None, [f"teacher.checkpoint={path}", "data.image_size=224", "teacher.num_heads=3", "teacher.dtype=fp32"]
    )
    teacher, info = load_teacher(cfg, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert info.embed_dim == 192 and len(info.sha256) == 64
    x = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        # A gray image repeated on R, G, B is what the folded one-channel embedding sees.
        expected = ref.forward_features(x.expand(-1, 3, -1, -1))[:, 1:]
        assert torch.allclose(teacher(x), expected, atol=1e-4)


IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_a_teacher_sees_a_gray_image_as_timm_sees_it_normalised_with_its_own_mean_and_std(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    torch.nn.init.normal_(ref.patch_embed.proj.bias, std=0.5)  # a bias the fold must keep
    path = tmp_path / "teacher.pth"
    torch.save(ref.state_dict(), path)
    mean, std = IMAGENET
    cfg = load_config(
        None,
        [
            f"teacher.checkpoint={path}",
            "data.image_size=64",
            "teacher.num_heads=3",
            "teacher.dtype=fp32",
            f"teacher.mean={mean}",
            f"teacher.std={std}",
        ],
    )
    teacher, info = load_teacher(cfg, torch.device("cpu"))
    assert info.mean == tuple(mean) and info.std == tuple(std)
    gray = torch.rand(2, 1, 64, 64)  # [0, 1] pixels
    rgb = (gray.expand(-1, 3, -1, -1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        expected = ref.forward_features(rgb)[:, 1:]
        torch.testing.assert_close(teacher(to_model_input(gray)), expected, atol=1e-4, rtol=1e-4)
        # Without the setting the teacher would get other latents: the fold matters.
        plain, _ = load_teacher(
            load_config(
                None, [f"teacher.checkpoint={path}", "data.image_size=64", "teacher.num_heads=3", "teacher.dtype=fp32"]
            ),
            torch.device("cpu"),
        )
        assert (plain(to_model_input(gray)) - expected).abs().max() > 0.1


def test_the_normalisation_a_checkpoint_ships_with_is_used_and_a_missing_final_norm_is_said(tmp_path):
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, global_pool="avg", fc_norm=True
    ).eval()  # MAE-style: fc_norm, no final norm on the tokens
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc_norm")}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    mean, std = IMAGENET
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": mean, "std": std}}))
    cfg = load_config(
        None, [f"teacher.checkpoint={path}", "data.image_size=64", "teacher.num_heads=3", "teacher.dtype=fp32"]
    )
    teacher, info = load_teacher(cfg, torch.device("cpu"))
    assert info.mean == tuple(mean) and not info.final_norm
    gray = torch.rand(1, 1, 64, 64)
    rgb = (gray.expand(-1, 3, -1, -1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        expected = ref.forward_features(rgb)[:, 1:]  # norm is Identity in this timm model
        torch.testing.assert_close(teacher(to_model_input(gray)), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match=r"teacher.mean=\[0.5, 0.5\]: .* has 3 input channels; give 1 or 3"):
        load_teacher(
            load_config(None, [f"teacher.checkpoint={path}", "teacher.mean=[0.5,0.5]", "teacher.std=[0.5,0.5]"]),
            torch.device("cpu"),
        )
    with pytest.raises(UserError, match="teacher.mean and teacher.std go together"):
        load_teacher(load_config(None, [f"teacher.checkpoint={path}", "teacher.mean=[0.5]"]), torch.device("cpu"))


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
        load_teacher(
            load_config(None, [f"teacher.checkpoint={path}", "model.patch_size=8", "data.image_size=64"]),
            torch.device("cpu"),
        )
    with pytest.raises(UserError, match="not a run dir"):
        load_teacher(load_config(None, [f"teacher.checkpoint={tmp_path / 'missing.pth'}"]), torch.device("cpu"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(UserError, match="not a timm-style ViT state dict"):
        load_teacher(load_config(None, [f"teacher.checkpoint={tmp_path / 'junk.pth'}"]), torch.device("cpu"))


@pytest.mark.parametrize("init", ["timm", "jax"])
def test_init_scheme_sets_the_linear_weights_of_encoder_and_predictor(init):
    # timm: truncated normal, std 0.02, cut at +-2 (absolute); jax: Xavier-uniform, bound
    # sqrt(6 / (fan_in + fan_out)), std = bound / sqrt(3). Biases start at zero (jax: the MLP's
    # at about 1e-6), the frozen sin-cos table is kept.
    torch.manual_seed(0)
    enc = Encoder(img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=4, init=init)
    pred = Predictor(in_dim=128, out_dim=64, grid=8, embed_dim=64, depth=2, num_heads=4, init=init)
    for name, layer in [
        ("encoder qkv", enc.blocks[0].attn.qkv),
        ("encoder fc2", enc.blocks[1].mlp.fc2),
        ("predictor qkv", pred.blocks[0].attn.qkv),
        ("predictor proj", pred.proj),
    ]:
        fan_out, fan_in = layer.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5 if init == "jax" else 2.0
        std = bound / 3**0.5 if init == "jax" else 0.02
        w = layer.weight.detach()
        assert w.abs().max() <= bound, name
        assert w.std().item() == pytest.approx(std, rel=0.05), name
        assert layer.bias.abs().max() < 1e-4, name
    assert not enc.pos_embed.requires_grad
    assert torch.equal(enc.pos_embed[0], sincos_pos_embed(8, 128))


@pytest.mark.parametrize("recompute", [False, True])
def test_packed_blocks_compute_what_the_padded_blocks_do(recompute):
    # Real tokens scattered among padding (not a prefix), as a context padded to its batch's
    # longest is, with LayerScale so that every branch of a block carries weights.
    torch.manual_seed(0)
    enc = Encoder(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, attention="matmul")
    for block in enc.blocks:
        block.ls1 = timm.layers.LayerScale(48, init_values=0.5)
    assert packable(enc.blocks)
    x = torch.randn(3, 7, 48, requires_grad=True)
    valid = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = valid[:, None, None, :]
    packed = run_blocks(enc.blocks, x, recompute, mask, valid)
    padded = run_blocks(enc.blocks, x, recompute, mask)
    assert packed.shape == padded.shape == (3, 7, 48)
    torch.testing.assert_close(packed[valid], padded[valid], atol=1e-5, rtol=1e-5)
    assert packed[~valid].abs().max().item() == 0.0  # padding rows come back as zeros
    # Gradients, with a loss that weighs each real token differently.
    weights = torch.randn(3, 7, 48)
    grads = [
        torch.autograd.grad((out * weights)[valid].sum(), [x, *enc.blocks.parameters()]) for out in (packed, padded)
    ]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert grads[0][0][~valid].abs().max().item() == 0.0  # nothing flows into padding


def test_blocks_with_stochastic_depth_are_not_packed():
    # DropPath drops whole samples; on packed tokens it would drop single tokens.
    assert not packable(Encoder(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, drop_path=0.1).blocks)
