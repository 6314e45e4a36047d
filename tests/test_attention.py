import importlib.util
import logging

import pytest
import timm
import torch

from usjepa.config import ConfigError, load_config
from usjepa.errors import UserError
from usjepa.models import attention as attn
from usjepa.models.predictor import Predictor, build_predictor
from usjepa.models.teacher import load_teacher
from usjepa.models.vit import Encoder, build_encoder

HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
HAS_CUDA = torch.cuda.is_available()


def tiny(**kw) -> Encoder:
    return Encoder(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, **kw)


def timm_twin() -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        in_chans=1,
        num_classes=0,
        global_pool="",
        class_token=False,
        embed_dim=48,
        depth=2,
        num_heads=3,
    ).eval()


def test_sdpa_encoder_matches_timm_default_attention():
    torch.manual_seed(0)
    ours = tiny(attention="sdpa").eval()
    ref = timm_twin()
    assert set(ours.state_dict()) == set(ref.state_dict())  # same keys: weights load both ways
    ref.load_state_dict(ours.state_dict())
    assert type(ref.blocks[0].attn) is timm.layers.attention.Attention
    assert isinstance(ours.blocks[0].attn, timm.layers.attention.Attention)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref.forward_features(x), atol=1e-5)


def test_timm_manual_path_agrees_too(monkeypatch):
    """timm's non-fused (explicit softmax) path, in case TIMM_FUSED_ATTN=0 is set somewhere."""
    torch.manual_seed(1)
    ours = tiny(attention="sdpa").eval()
    ref = timm_twin()
    ref.load_state_dict(ours.state_dict())
    for block in ref.blocks:
        block.attn.fused_attn = False
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref.forward_features(x), atol=1e-5)


SMALL = [
    "model.patch_size=8",
    "model.embed_dim=48",
    "model.depth=1",
    "model.num_heads=3",
    "predictor.depth=1",
    "predictor.embed_dim=32",
    "predictor.num_heads=2",
]


def test_all_modules_use_the_setting():
    enc = build_encoder(load_config(None, SMALL + ["model.attention=sdpa"]).model, 32)
    assert all(type(b.attn) is attn.SdpaAttention for b in enc.blocks)
    enc = build_encoder(load_config(None, SMALL).model, 32)  # default auto, no device: resolved on first forward
    assert all(b.attn.backend == "auto" for b in enc.blocks)
    pred = build_predictor(load_config(None, SMALL).predictor, 48, 7, 4, attention="auto", device="cpu")
    assert all(type(b.attn) is attn.SdpaAttention for b in pred.blocks)
    cfg = load_config(
        None,
        [
            "model.patch_size=8",
            "data.image_size=32",
            "model.embed_dim=48",
            "model.depth=1",
            "model.num_heads=3",
            "model.attention=auto",
        ],
    )
    teacher, _ = load_teacher(cfg, torch.device("cpu"))  # bf16 on the CPU: plain matmuls are faster
    assert all(type(b.attn) is attn.MatmulAttention for b in teacher.blocks)


def test_auto_on_cpu_resolves_to_sdpa_in_fp32_and_matmul_in_bf16_with_a_reason(caplog):
    res = attn.explain_backend("auto", torch.device("cpu"), torch.float32)
    assert res.backend == "sdpa"
    assert "auto uses sdpa" in res.reason and ("CUDA" in res.reason or "not importable" in res.reason)
    res = attn.explain_backend("auto", torch.device("cpu"), torch.bfloat16)
    assert res.backend == "matmul" and "auto uses matmul on cpu" in res.reason
    attn._SAID.clear()
    with caplog.at_level(logging.INFO, logger="usjepa.models.attention"):
        assert attn.resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
        assert attn.resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert len([r for r in caplog.records if "auto uses sdpa" in r.message]) == 1  # said once


def test_auto_layer_runs_on_cpu_without_error():
    torch.manual_seed(0)
    auto, sdpa = tiny(attention="auto").eval(), tiny(attention="sdpa").eval()
    sdpa.load_state_dict(auto.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(auto(x), sdpa(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto(x)
    assert set(auto.blocks[0].attn._resolved.values()) == {"sdpa", "matmul"}


@pytest.mark.parametrize("masked", [False, True])
def test_matmul_attention_equals_sdpa_with_and_without_a_mask(masked):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    mask = (torch.rand(2, 1, 7, 7) > 0.4) | torch.eye(7, dtype=torch.bool) if masked else None
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(attn.matmul_attention(q, k, v, mask, 0.0, False, 0.3), want)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(attn.matmul_attention(q, k, v, None, 0.0, True, 0.3), causal)
    # The layers, gradients included, on a padded context.
    ours, ref = tiny(attention="matmul"), tiny(attention="sdpa")
    ref.load_state_dict(ours.state_dict())
    x, keep = torch.randn(2, 1, 32, 32), torch.tensor([[0, 3, 5, 9, 9], [1, 2, 4, 6, 8]])
    valid = torch.tensor([[True] * 4 + [False], [True] * 5])
    out_m, out_s = ours(x, keep, valid), ref(x, keep, valid)
    torch.testing.assert_close(out_m, out_s, atol=1e-5, rtol=1e-5)
    out_m[:, :4].sum().backward()
    out_s[:, :4].sum().backward()
    torch.testing.assert_close(
        ours.blocks[0].attn.qkv.weight.grad, ref.blocks[0].attn.qkv.weight.grad, atol=1e-5, rtol=1e-4
    )


@pytest.mark.skipif(HAS_XFORMERS and HAS_CUDA, reason="xformers can run here")
def test_explicit_xformers_on_cpu_is_a_one_line_user_error():
    with pytest.raises(UserError) as e:
        attn.resolve_backend("xformers", torch.device("cpu"), torch.float32)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model.attention=xformers cannot run: ")
    assert "pip install -e '.[gpu]'" in msg and "model.attention=sdpa" in msg
    with pytest.raises(UserError):
        build_encoder(load_config(None, ["model.attention=xformers"]).model, 32, device="cpu")
    cfg = load_config(
        None,
        [
            "model.patch_size=8",
            "data.image_size=32",
            "model.embed_dim=48",
            "model.depth=1",
            "model.num_heads=3",
            "model.attention=xformers",
        ],
    )
    with pytest.raises(UserError, match="model.attention=sdpa"):
        load_teacher(cfg, torch.device("cpu"))
    # a lazily resolved layer fails the same way on its first forward
    with pytest.raises(UserError, match="pip install"):
        tiny(attention="xformers")(torch.randn(1, 1, 32, 32))


def test_failed_startup_check_falls_back_under_auto(monkeypatch):
    """The CUDA branch's logic, faked on CPU: a failed check means sdpa for auto, an error for xformers."""
    fake = type("xops", (), {"memory_efficient_attention": staticmethod(lambda q, k, v, **kw: q)})
    monkeypatch.setattr(attn, "_import_xformers", lambda: (fake, ""))
    monkeypatch.setattr(attn, "_normalize_device", lambda d: torch.device(d))
    monkeypatch.setattr(attn, "_CHECKS", {})
    dev = torch.device("cpu")
    ok, why = attn._startup_check(dev, torch.float32)  # returns q, not attention: must fail
    assert not ok and "disagrees with SDPA" in why
    monkeypatch.setattr(attn, "_startup_check", lambda d, t: (False, "xformers disagrees (faked)"))
    cuda = torch.device("cuda", 0)
    assert attn.explain_backend("auto", cuda).backend == "sdpa"
    assert "disagrees" in attn.explain_backend("auto", cuda).reason
    with pytest.raises(UserError, match="disagrees"):
        attn.explain_backend("xformers", cuda)
    monkeypatch.setattr(attn, "_startup_check", lambda d, t: (True, ""))
    assert attn.explain_backend("auto", cuda).backend == "xformers"
    assert attn.explain_backend("xformers", cuda).backend == "xformers"
    assert attn.explain_backend("auto", dev).backend == "sdpa"  # never xformers off CUDA


@pytest.mark.skipif(not (HAS_XFORMERS and HAS_CUDA), reason="needs xformers and a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_backends_agree_on_cuda(dtype, tol):
    assert attn.resolve_backend("xformers", torch.device("cuda"), dtype) == "xformers"
    torch.manual_seed(0)
    xf = Encoder(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3, attention="xformers")
    sd = Encoder(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3, attention="sdpa")
    sd.load_state_dict(xf.state_dict())
    xf, sd = (m.to("cuda", dtype).eval() for m in (xf, sd))
    x = torch.randn(4, 1, 64, 64, device="cuda", dtype=dtype)
    keep = torch.stack([torch.randperm(64, device="cuda")[:40] for _ in range(4)])
    with torch.no_grad():
        for a, b in ((xf(x), sd(x)), (xf(x, keep), sd(x, keep))):
            assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
    pred_x = Predictor(in_dim=96, out_dim=7, grid=8, embed_dim=48, depth=1, num_heads=2, attention="xformers")
    pred_s = Predictor(in_dim=96, out_dim=7, grid=8, embed_dim=48, depth=1, num_heads=2, attention="sdpa")
    pred_s.load_state_dict(pred_x.state_dict())
    pred_x, pred_s = (m.to("cuda", dtype).eval() for m in (pred_x, pred_s))
    tokens = torch.randn(4, 40, 96, device="cuda", dtype=dtype)
    targets = torch.stack([torch.stack([torch.randperm(64, device="cuda")[:8] for _ in range(4)]) for _ in range(2)])
    with torch.no_grad():
        assert torch.allclose(
            pred_x(tokens, keep, targets).float(), pred_s(tokens, keep, targets).float(), atol=tol, rtol=tol
        )
    # gradients flow through the xformers path too
    xf.train().requires_grad_(True)
    xf(x).float().square().mean().backward()
    assert all(p.grad is not None for p in xf.blocks[0].attn.qkv.parameters())


@pytest.mark.parametrize("value", ["auto", "sdpa", "xformers", "matmul"])
def test_config_accepts_the_four_settings(value):
    assert load_config(None, [f"model.attention={value}"]).model.attention == value


def test_config_default_is_auto():
    assert load_config(None).model.attention == "auto"


@pytest.mark.parametrize(
    "value, hint", [("xformer", "did you mean 'xformers'?"), ("spda", "did you mean 'sdpa'?"), ("flash", "")]
)
def test_config_rejects_other_settings_with_a_suggestion(value, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.attention={value}"])
    msg = str(e.value)
    assert msg.startswith("model.attention:") and "auto, sdpa, xformers, matmul" in msg and hint in msg
