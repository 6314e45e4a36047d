"""Representation-health figures on features with known answers."""

import math

import pytest
import torch

from usjepa.train.health import feature_std, rankme


def orthonormal(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """[n, d] with orthonormal, zero-mean columns."""
    a = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(a - a.mean(0))
    return q


def test_rankme_of_r_equal_directions_is_r():
    q = orthonormal(200, 16)
    for r in (1, 4, 16):
        assert rankme(5.0 * q[:, :r]) == pytest.approx(r, rel=1e-5)
    # collapse onto 3 directions in 64 dims: 3, however wide the features (up to the 1e-7 that
    # RankMe adds to each of the 61 zero singular values)
    assert rankme(torch.cat([q[:, :3], torch.zeros(200, 61, dtype=torch.float64)], 1)) == pytest.approx(3, rel=2e-4)


def test_rankme_of_singular_values_3_and_1():
    q = orthonormal(50, 2)
    features = q * torch.tensor([3.0, 1.0], dtype=torch.float64)
    p = torch.tensor([0.75, 0.25])
    assert rankme(features) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)  # 1.7548


def test_rankme_ignores_the_mean_all_features_share():
    q = orthonormal(200, 4)
    assert rankme(q + 100.0) == pytest.approx(rankme(q), rel=1e-9) == pytest.approx(4, rel=1e-5)


def test_rankme_of_non_finite_features_is_nan():
    assert math.isnan(rankme(torch.tensor([[1.0, float("inf")], [0.0, 1.0]])))


def test_feature_std_of_collapsed_and_of_orthogonal_features():
    assert feature_std(torch.ones(10, 8)) == 0.0
    # the 4 unit vectors of R^4: every dim holds one 1 and three 0s, sd (n-1) = 0.5
    assert feature_std(torch.eye(4)) == pytest.approx(0.5)
