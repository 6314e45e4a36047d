"""kNN probe (DINO protocol): exact votes on hand-built cases, chunking, standardisation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from usjepa.config import ConfigError, ProbeConfig, load_config
from usjepa.eval.knn import knn_predict, knn_probe, knn_votes
from usjepa.eval.metrics import scores
from usjepa.eval.probe import ProbeSplit


def unit(*degrees: float) -> np.ndarray:
    """Unit vectors in the plane at these angles: their cosine similarity is cos(a - b)."""
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


# The query lies at 0 degrees. Its nearest train row (10 degrees) is class 0, the next two
# (20 and 25 degrees) are class 1, the last one (150 degrees) class 2.
TRAIN_X = unit(150, 20, 10, 25)
TRAIN_Y = np.array([2, 1, 0, 1])
QUERY = unit(0)


def cos(degrees: float) -> float:
    return math.cos(math.radians(degrees))


def expected_votes(sims_by_class: dict[int, list[float]], temperature: float) -> np.ndarray:
    """exp((sim - best) / T) summed per class, as knn_votes scales them."""
    best = max(max(s) for s in sims_by_class.values())
    votes = np.zeros(3)
    for c, sims in sims_by_class.items():
        votes[c] = sum(math.exp((s - best) / temperature) for s in sims)
    return votes


def test_k1_is_the_nearest_row_and_k3_the_weighted_vote():
    assert knn_predict(TRAIN_X, TRAIN_Y, QUERY, 3, k=1, temperature=0.07).tolist() == [0]
    votes = knn_votes(TRAIN_X, TRAIN_Y, QUERY, 3, k=1, temperature=0.07)
    np.testing.assert_allclose(votes, [[1.0, 0.0, 0.0]], rtol=1e-6)

    # k=3 at T=1: the two farther class-1 rows outvote the nearest one (0.96 + 0.92 > 1)
    votes = knn_votes(TRAIN_X, TRAIN_Y, QUERY, 3, k=3, temperature=1.0)
    expected = expected_votes({0: [cos(10)], 1: [cos(20), cos(25)]}, 1.0)
    np.testing.assert_allclose(votes[0], expected, rtol=1e-6)
    assert expected[1] > expected[0]
    assert knn_predict(TRAIN_X, TRAIN_Y, QUERY, 3, k=3, temperature=1.0).tolist() == [1]

    # the same three neighbours at DINO's T=0.07: the nearest weighs more than both others
    votes = knn_votes(TRAIN_X, TRAIN_Y, QUERY, 3, k=3, temperature=0.07)
    expected = expected_votes({0: [cos(10)], 1: [cos(20), cos(25)]}, 0.07)
    np.testing.assert_allclose(votes[0], expected, rtol=1e-5)
    assert expected[0] > expected[1]  # 1 > exp(-0.64) + exp(-1.12) = 0.85
    assert knn_predict(TRAIN_X, TRAIN_Y, QUERY, 3, k=3, temperature=0.07).tolist() == [0]


def test_k_beyond_the_train_split_uses_every_row():
    votes = knn_votes(TRAIN_X, TRAIN_Y, QUERY, 3, k=100, temperature=1.0)
    expected = expected_votes({0: [cos(10)], 1: [cos(20), cos(25)], 2: [cos(150)]}, 1.0)
    np.testing.assert_allclose(votes[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(votes, knn_votes(TRAIN_X, TRAIN_Y, QUERY, 3, k=4, temperature=1.0))


def test_ties_go_to_the_earlier_train_row_then_the_smaller_class():
    # rows 1 and 2 are the same point with classes 2 and 1; row 0 is far away
    train_x, train_y = unit(90, 0, 0), np.array([0, 2, 1])
    for chunk in (1, 2, 8192):  # the tie rule does not depend on the chunking
        # k=1: the two equally near rows cannot both vote; the earlier one (class 2) does
        assert knn_predict(train_x, train_y, unit(0), 3, 1, 0.07, train_chunk=chunk).tolist() == [2]
        # k=2: both vote with the same weight; the smaller class index wins
        votes = knn_votes(train_x, train_y, unit(0), 3, 2, 0.07, train_chunk=chunk)
        np.testing.assert_array_equal(votes, [[0.0, 1.0, 1.0]])
        assert knn_predict(train_x, train_y, unit(0), 3, 2, 0.07, train_chunk=chunk).tolist() == [1]


def test_chunked_equals_unchunked_and_a_brute_force_reference():
    rng = np.random.default_rng(0)
    train_x, train_y = rng.normal(size=(300, 16)), rng.integers(0, 5, 300)
    queries = rng.normal(size=(70, 16))
    whole = knn_votes(train_x, train_y, queries, 5, k=7, temperature=0.1)
    chunked = knn_votes(train_x, train_y, queries, 5, k=7, temperature=0.1, query_chunk=9, train_chunk=13)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    np.testing.assert_array_equal(
        knn_predict(train_x, train_y, queries, 5, 7, 0.1, query_chunk=9, train_chunk=13),
        knn_predict(train_x, train_y, queries, 5, 7, 0.1),
    )

    # the definition, in float64 with a full sort
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    reference = np.zeros((70, 5))
    for i, sims in enumerate(b @ a.T):
        top = np.argsort(-sims, kind="stable")[:7]
        np.add.at(reference[i], train_y[top], np.exp((sims[top] - sims[top].max()) / 0.1))
    np.testing.assert_allclose(whole, reference, rtol=1e-4)
    np.testing.assert_array_equal(whole.argmax(axis=1), reference.argmax(axis=1))


def test_knn_probe_standardises_with_train_statistics():
    rng = np.random.default_rng(1)

    def split(n):  # the class is in column 0; column 1 is large noise on a large offset
        y = np.arange(n) % 3
        return ProbeSplit(np.stack([y + 0.1 * rng.normal(size=n), 1000 * rng.normal(size=n) + 5000], 1), y)

    splits = {"train": split(60), "val": split(21), "test": split(30)}
    for standardize in (True, False):
        cfg = ProbeConfig(knn_k=5, knn_temperature=0.1, standardize=standardize)
        result = knn_probe(splits, 3, cfg)
        x = {name: s.features.astype(np.float64) for name, s in splits.items()}
        if standardize:
            mean, std = x["train"].mean(axis=0), x["train"].std(axis=0)
            x = {name: (v - mean) / std for name, v in x.items()}
        pred = {name: knn_predict(x["train"], splits["train"].labels, x[name], 3, 5, 0.1) for name in ("val", "test")}
        test, val = scores(splits["test"].labels, pred["test"], 3), scores(splits["val"].labels, pred["val"], 3)
        assert result == {
            **test,
            "val_macro_f1": val["macro_f1"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "k": 5,
            "temperature": 0.1,
        }
    assert knn_probe(splits, 3, dataclasses.replace(cfg, knn_k=500))["k"] == 60


@pytest.mark.parametrize(
    "override, key",
    [
        ("probe.knn_k=0", "probe.knn_k"),
        ("probe.knn_temperature=0", "probe.knn_temperature"),
        ("probe.knn_temperature=-0.1", "probe.knn_temperature"),
        ("probe.pixels_size=0", "probe.pixels_size"),
        ("probe.histogram_bins=0", "probe.histogram_bins"),
    ],
)
def test_bad_knn_and_baseline_settings_fail_on_load(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: must be"):
        load_config(None, [override])
