"""The objectives as pure functions: which pixels a token stands for, which rows of the
targets and predictions belong to which block of which sample, and how the loss weighs them."""

import torch
import torch.nn.functional as F

from usjepa.config import TrainConfig
from usjepa.models.predictor import Predictor
from usjepa.models.vit import Encoder
from usjepa.train.objectives import latent_targets, patchify, pixel_targets, regression_loss


def test_patch_n_is_row_n_div_width_column_n_mod_width():
    image = torch.arange(8 * 12, dtype=torch.float32).reshape(1, 1, 8, 12)  # not square: rows and columns differ
    patches = patchify(image, 4)
    assert patches.shape == (1, 6, 16)
    for n in range(6):
        r, c = divmod(n, 3)
        assert torch.equal(patches[0, n], image[0, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].flatten())


def test_pixel_targets_are_the_encoders_tokens_in_the_same_order():
    # The MAE target of token n must be the pixels the encoder's patch embedding saw at token n.
    torch.manual_seed(0)
    enc = Encoder(img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2)
    images = torch.randn(2, 1, 16, 16)
    proj = enc.patch_embed.proj
    embedded = enc.patch_embed(images)  # [B, N, D], no position embedding yet
    by_hand = patchify(images, 4) @ proj.weight.reshape(8, -1).T + proj.bias
    torch.testing.assert_close(embedded, by_hand, atol=1e-5, rtol=1e-5)


def test_pixel_targets_gather_z_scored_patches_block_major():
    image = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    image[1] = image[1] ** 2  # the two samples differ in more than an offset
    idx = torch.tensor([[[3, 0], [1, 2]], [[2, 2], [0, 3]]])  # [T=2, B=2, K=2]
    raw = pixel_targets(image, 4, idx, normalize=False)
    patches = patchify(image, 4)
    for t in range(2):
        for b in range(2):
            assert torch.equal(raw[t * 2 + b], patches[b, idx[t, b]])
    z = pixel_targets(image, 4, idx, normalize=True)
    p = patches[1, 0]  # row t=1, b=1, k=0 is patch 0 of sample 1
    torch.testing.assert_close(z[3, 0], (p - p.mean()) / (p.var() + 1e-6).sqrt())
    assert torch.allclose(z.mean(-1), torch.zeros(4, 2), atol=1e-5)


def test_latent_targets_row_t_times_b_plus_b_is_block_t_of_sample_b():
    b_, n_, d_ = 3, 5, 4
    latents = (
        100 * torch.arange(b_)[:, None, None] + 10 * torch.arange(n_)[None, :, None] + torch.arange(d_)[None, None, :]
    ).float()
    idx = torch.tensor([[[4, 1], [0, 0], [2, 3]], [[1, 2], [3, 4], [0, 1]]])  # [T=2, B=3, K=2]
    got = latent_targets(latents, idx, layernorm=False)
    assert got.shape == (6, 2, 4)
    for t in range(2):
        for b in range(b_):
            for k in range(2):
                assert got[t * b_ + b, k, 0].item() == 100 * b + 10 * idx[t, b, k].item()
    normed = latent_targets(latents, idx, layernorm=True)
    torch.testing.assert_close(normed, F.layer_norm(got, (d_,)))


def test_predictions_come_in_the_targets_row_order_in_both_layouts():
    # One block deep, a mask token sees the same keys in both layouts (the context and its own
    # block), so the layouts must agree row for row; a swapped block or sample order would not.
    torch.manual_seed(0)
    per_block = Predictor(in_dim=12, out_dim=5, grid=4, embed_dim=16, depth=1, num_heads=2, layout="per_block").eval()
    shared = Predictor(in_dim=12, out_dim=5, grid=4, embed_dim=16, depth=1, num_heads=2, layout="shared_context").eval()
    shared.load_state_dict(per_block.state_dict())
    ctx, ctx_idx = torch.randn(2, 3, 12), torch.tensor([[0, 5, 9], [2, 7, 11]])
    targets = torch.tensor([[[1, 2], [3, 4]], [[6, 10], [8, 12]], [[13, 14], [15, 0]]])  # T=3, B=2
    a, b = per_block(ctx, ctx_idx, targets), shared(ctx, ctx_idx, targets)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Row t*B + b holds block t of sample b: its prediction is that block predicted alone.
    alone = per_block(ctx[1:], ctx_idx[1:], targets[2:, 1:])
    torch.testing.assert_close(a[2 * 2 + 1], alone[0], atol=1e-5, rtol=1e-5)


def test_the_loss_is_the_mean_over_blocks_of_each_blocks_mean():
    # Two samples, two blocks, rows block-major (t0 s0, t0 s1, t1 s0, t1 s1), padded to 3
    # tokens; 9 marks padding, which must not count.
    pred = torch.zeros(4, 3, 1)
    target = torch.tensor([[2.0, 9, 9], [1, 1, 4], [3, 3, 9], [0, 2, 9]])[..., None]
    valid = target[..., 0] != 9
    cfg = TrainConfig(loss="l1")
    # block means 2, 2, 3, 1: sample 0 (2 + 3) / 2 = 2.5, sample 1 (2 + 1) / 2 = 1.5, mean 2.
    assert regression_loss(pred, target, valid, 2, cfg).item() == 2.0
    target[0, 0, 0] = 6.0  # a one-token block weighs as much as a three-token one
    assert regression_loss(pred, target, valid, 2, cfg).item() == ((6 + 3) / 2 + 1.5) / 2


def test_an_empty_block_does_not_count():
    pred = torch.zeros(4, 2, 1)
    target = torch.tensor([[2.0, 2], [4, 9], [9, 9], [6, 9]])[..., None]
    valid = target[..., 0] != 9  # block 1 of sample 0 (row 2) is empty
    # sample 0: its one non-empty block, 2; sample 1: (4 + 6) / 2 = 5.
    assert regression_loss(pred, target, valid, 2, TrainConfig(loss="l1")).item() == (2 + 5) / 2


def test_the_loss_kinds_match_torch_on_unpadded_blocks():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    for kind, ref in [
        ("mse", F.mse_loss(pred, target)),
        ("l1", F.l1_loss(pred, target)),
        ("smooth_l1", F.smooth_l1_loss(pred, target, beta=0.5)),
    ]:
        got = regression_loss(pred, target, None, 2, TrainConfig(loss=kind, smooth_l1_beta=0.5))
        torch.testing.assert_close(got, ref)
