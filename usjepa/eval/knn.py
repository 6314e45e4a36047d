"""kNN probe on frozen features, the DINO protocol (Caron et al. 2021).

Features are z-scored with the train split's statistics (as for the linear probe), then
L2-normalised; each query's k most cosine-similar train rows vote for their class with weight
exp(sim / T), and the class with the largest summed vote wins (a tie goes to the smallest
class index). Nothing is trained, so there are no seeds: the result is one number per split.

Similarities are computed for a chunk of queries against a chunk of train rows at a time,
keeping a running top k per query, so a 30k x 30k case holds one chunk, never 30k^2 values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from usjepa.config import ProbeConfig
from usjepa.errors import UserError
from usjepa.eval.features import standardized, standardizer
from usjepa.eval.metrics import scores

if TYPE_CHECKING:
    from usjepa.eval.probe import ProbeSplit

_QUERY_CHUNK = 1024
_TRAIN_CHUNK = 8192


def _top_k(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row [Q, N] and their column positions, in column order.

    Among equal values the leftmost columns are kept, whatever order torch.topk returns ties
    in: duplicate train rows of different classes then vote the same way on every device and
    for every chunk size."""
    k = min(k, values.shape[1])
    kth = values.topk(k, dim=1).values[:, -1:]
    above = values > kth
    tied = values == kth
    room = k - above.sum(dim=1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=1) <= room))
    positions = keep.nonzero()[:, 1].view(-1, k)  # exactly k per row, row-major
    return values.gather(1, positions), positions


@torch.no_grad()
def knn_votes(
    train_x: np.ndarray,
    train_y: np.ndarray,
    queries: np.ndarray,
    num_classes: int,
    k: int,
    temperature: float,
    device: torch.device | str = "cpu",
    *,
    query_chunk: int = _QUERY_CHUNK,
    train_chunk: int = _TRAIN_CHUNK,
) -> np.ndarray:
    """Summed votes per class [Q, num_classes] of each query row against the train rows.

    Rows are L2-normalised here (standardise them before, if wanted). The min(k, N_train)
    most similar train rows vote; among equally similar rows the earlier train rows vote.
    A vote weighs exp((sim - s_max) / T), s_max being the query's highest similarity: the
    same ratios as exp(sim / T), without overflow at small T.
    """
    if k < 1:
        raise UserError(f"probe.knn_k must be at least 1, got {k}")
    if temperature <= 0:
        raise UserError(f"probe.knn_temperature must be > 0, got {temperature}")
    device = torch.device(device)
    train = F.normalize(torch.as_tensor(train_x, dtype=torch.float32, device=device), dim=1)
    labels = torch.as_tensor(train_y, dtype=torch.int64, device=device)
    votes = []
    for q0 in range(0, queries.shape[0], query_chunk):
        query = torch.as_tensor(queries[q0 : q0 + query_chunk], dtype=torch.float32, device=device)
        query = F.normalize(query, dim=1)
        best_sim = best_idx = None
        for t0 in range(0, train.shape[0], train_chunk):
            sim, idx = _top_k(query @ train[t0 : t0 + train_chunk].T, k)
            idx = idx + t0
            if best_sim is not None:  # earlier train rows first, so ties still go to them
                sim, pos = _top_k(torch.cat([best_sim, sim], dim=1), k)
                idx = torch.cat([best_idx, idx], dim=1).gather(1, pos)
            best_sim, best_idx = sim, idx
        weights = torch.exp((best_sim - best_sim.max(dim=1, keepdim=True).values) / temperature)
        # A one-hot sum rather than scatter_add_: float atomics on CUDA add in varying order.
        votes.append((weights.unsqueeze(2) * F.one_hot(labels[best_idx], num_classes)).sum(dim=1))
    if not votes:
        return np.zeros((0, num_classes), dtype=np.float32)
    return torch.cat(votes).cpu().numpy()


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    queries: np.ndarray,
    num_classes: int,
    k: int,
    temperature: float,
    device: torch.device | str = "cpu",
    **chunks: int,
) -> np.ndarray:
    """Class index per query row: the largest summed vote, the smallest class on a tie."""
    votes = knn_votes(train_x, train_y, queries, num_classes, k, temperature, device, **chunks)
    return votes.argmax(axis=1).astype(np.int64)  # argmax takes the first of equal maxima


def knn_probe(
    splits: dict[str, ProbeSplit], num_classes: int, cfg: ProbeConfig, device: torch.device | str = "cpu"
) -> dict:
    """kNN scores of splits['val'] and splits['test'] against splits['train'] (checked by the
    caller): macro_f1, balanced_accuracy, accuracy (test), val_macro_f1,
    val_balanced_accuracy, and the k (capped at the train size) and temperature used."""
    train = splits["train"]
    mean, std = standardizer(train.features) if cfg.standardize else (0.0, 1.0)
    train_x = standardized(train.features, mean, std)
    split_scores = {}
    for name in ("val", "test"):
        queries = standardized(splits[name].features, mean, std)
        pred = knn_predict(train_x, train.labels, queries, num_classes, cfg.knn_k, cfg.knn_temperature, device)
        split_scores[name] = scores(splits[name].labels, pred, num_classes)
    return {
        **split_scores["test"],
        "val_macro_f1": split_scores["val"]["macro_f1"],
        "val_balanced_accuracy": split_scores["val"]["balanced_accuracy"],
        "k": min(cfg.knn_k, len(train)),
        "temperature": cfg.knn_temperature,
    }
