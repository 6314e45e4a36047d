"""Linear probe on frozen features (docs/method.md#probe-protocol).

One linear layer trained with cross-entropy, AdamW (lr 1e-3, wd 1e-4), batch 32 and a
per-step cosine schedule over up to 150 epochs, early-stopped on validation loss (patience
15); 5 seeds, mean and sd of macro-F1. The settings come from `ProbeConfig`. `run_probe`
also scores each seed on the val split and runs the kNN probe (knn.py) on the same splits.

Features live in memory (on `device`) as one tensor per split, so a seed of a few hundred
samples x a few hundred dims runs in well under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix

from usjepa.config import ProbeConfig
from usjepa.errors import UserError
from usjepa.eval.features import standardized, standardizer
from usjepa.eval.knn import knn_probe
from usjepa.eval.metrics import scores

SPLITS = ("train", "val", "test")
_EVAL_CHUNK = 8192  # rows per forward when evaluating a whole split


@dataclass
class ProbeSplit:
    """Precomputed features [N, D] and integer labels [N] of one split."""

    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        self.labels = np.asarray(self.labels)
        if self.features.ndim != 2:
            raise UserError(f"probe features must be 2-D [N, D], got shape {self.features.shape}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.features.shape[0]:
            raise UserError(
                f"probe labels must be 1-D with one label per feature row: "
                f"{self.labels.shape} labels for {self.features.shape[0]} rows"
            )
        if self.labels.size and not np.issubdtype(self.labels.dtype, np.integer):
            raise UserError(f"probe labels must be integers, got dtype {self.labels.dtype}")
        self.labels = self.labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _empty_msg(name: str) -> str:
    return f"the {name} split is empty; the probe needs samples in train, val and test"


def _check_split(name: str, split: ProbeSplit, num_classes: int, dim: int | None = None) -> None:
    if len(split) == 0:
        raise UserError(_empty_msg(name))
    if dim is not None and split.features.shape[1] != dim:
        raise UserError(f"the {name} split has {split.features.shape[1]} features per sample, train has {dim}")
    lo, hi = int(split.labels.min()), int(split.labels.max())
    if lo < 0 or hi >= num_classes:
        raise UserError(
            f"the {name} split has labels in [{lo}, {hi}] but there are {num_classes} classes "
            f"(labels must be 0..{num_classes - 1})"
        )
    if not np.isfinite(split.features).all():
        raise UserError(f"the {name} split has NaN or infinite features")


def _fold(linear: torch.nn.Linear, mean: np.ndarray, std: np.ndarray) -> torch.nn.Linear:
    """W (x - m) / s + b  ==  (W / s) x + (b - (W / s) m): one affine map on raw features."""
    with torch.no_grad():
        w = linear.weight.detach().double().cpu()
        b = linear.bias.detach().double().cpu()
        w_raw = w / torch.from_numpy(std)[None, :]
        b_raw = b - w_raw @ torch.from_numpy(mean)
        linear.weight.copy_(w_raw.to(linear.weight))
        linear.bias.copy_(b_raw.to(linear.bias))
    return linear


@torch.no_grad()
def _mean_ce(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    total = x.new_zeros(())
    for i in range(0, x.shape[0], _EVAL_CHUNK):
        sl = slice(i, i + _EVAL_CHUNK)
        total += F.cross_entropy(model(x[sl]), y[sl], reduction="sum")
    return total / x.shape[0]


@torch.no_grad()
def _logits(model: torch.nn.Module, features: np.ndarray, device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    model.eval()
    return torch.cat([model(x[i : i + _EVAL_CHUNK]) for i in range(0, x.shape[0], _EVAL_CHUNK)])


def predict(model: torch.nn.Module, features: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Class index per row of raw (unstandardized) features."""
    return _logits(model, features, device).argmax(dim=1).cpu().numpy().astype(np.int64)


def class_probabilities(model: torch.nn.Module, features: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Softmax class probabilities [N, C] per row of raw features (for video-level means)."""
    return _logits(model, features, device).softmax(dim=1).cpu().numpy()


def train_probe(
    train: ProbeSplit,
    val: ProbeSplit,
    num_classes: int,
    seed: int,
    cfg: ProbeConfig,
    device: torch.device | str = "cpu",
) -> tuple[torch.nn.Linear, dict]:
    """Train one linear layer on `train`, early-stopped on the cross-entropy of `val`.

    With cfg.standardize the features are z-scored with the TRAIN mean and population std;
    after training that transform is folded into the layer, so the returned module is a
    single `nn.Linear` applied to raw features. Initialisation (PyTorch's default
    U(-1/sqrt(D), 1/sqrt(D))) and the per-epoch shuffle both come from a CPU generator seeded
    with `seed`, so a seed gives the same model on every run (and the same batches on any
    device); the global RNG is left untouched.

    The learning rate follows a cosine from cfg.lr to 0 over cfg.max_epochs * steps_per_epoch
    optimizer steps (no warm-up; the last partial batch is kept). Training stops once the
    validation loss has not improved for cfg.patience epochs; the weights of the best epoch
    are restored. Epoch numbers in the history are 1-based.

    Returns (model in eval mode on `device`, history) with history keys: epochs, best_epoch,
    best_val_loss, stopped_early, train_loss (per epoch), val_loss (per epoch).
    """
    device = torch.device(device)
    with _single_cpu_thread(device):
        return _train_probe(train, val, num_classes, seed, cfg, device)


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device):
    """On CPU, run the probe on one intra-op thread: its ops are tiny, so extra threads only
    add synchronisation, and on a busy machine they made a seed ~15x slower. The previous
    thread count is restored afterwards (it is process-wide while the probe runs)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_probe(
    train: ProbeSplit,
    val: ProbeSplit,
    num_classes: int,
    seed: int,
    cfg: ProbeConfig,
    device: torch.device,
) -> tuple[torch.nn.Linear, dict]:
    dim = _check_probe_inputs(train, val, num_classes, cfg)
    mean, std = standardizer(train.features) if cfg.standardize else (np.zeros(dim), np.ones(dim))
    x_tr, y_tr = _standardized_tensors(train, mean, std, device)
    x_va, y_va = _standardized_tensors(val, mean, std, device)
    # One generator draws the initial weights, then each epoch's shuffle: a seed's whole stream.
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    model = _seeded_linear(dim, num_classes, gen).to(device)
    history = _fit_early_stopped(model, x_tr, y_tr, x_va, y_va, gen, cfg)
    _fold(model, mean, std)
    model.eval()
    return model, history


def _check_probe_inputs(train: ProbeSplit, val: ProbeSplit, num_classes: int, cfg: ProbeConfig) -> int:
    """The feature dimension, once the classes, settings and both splits are usable."""
    if num_classes < 2:
        raise UserError(f"the probe needs at least 2 classes, got {num_classes}")
    if cfg.max_epochs < 1 or cfg.batch_size < 1 or cfg.patience < 1:
        raise UserError(
            f"probe settings must be positive: max_epochs={cfg.max_epochs}, "
            f"batch_size={cfg.batch_size}, patience={cfg.patience}"
        )
    _check_split("train", train, num_classes)
    dim = train.features.shape[1]
    _check_split("val", val, num_classes, dim)
    return dim


def _standardized_tensors(
    split: ProbeSplit, mean: np.ndarray, std: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    x = standardized(split.features, mean, std)
    return torch.from_numpy(x).to(device), torch.from_numpy(split.labels).to(device)


def _seeded_linear(dim: int, num_classes: int, gen: torch.Generator) -> torch.nn.Linear:
    """nn.Linear with PyTorch's default U(-1/sqrt(D), 1/sqrt(D)) drawn from `gen`, weight then
    bias, instead of from the global RNG."""
    model = torch.nn.Linear(dim, num_classes)
    bound = 1.0 / math.sqrt(dim)
    with torch.no_grad():
        model.weight.copy_(torch.empty(num_classes, dim).uniform_(-bound, bound, generator=gen))
        model.bias.copy_(torch.empty(num_classes).uniform_(-bound, bound, generator=gen))
    return model


def _fit_early_stopped(
    model: torch.nn.Linear,
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_va: torch.Tensor,
    y_va: torch.Tensor,
    gen: torch.Generator,
    cfg: ProbeConfig,
) -> dict:
    """Train `model` until the validation loss has not improved for cfg.patience epochs (or
    cfg.max_epochs), leave it with the weights of its best epoch and return the history."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_loss = math.inf
    best_epoch = 0
    best_state = _state_copy(model)
    train_hist: list[float] = []
    val_hist: list[float] = []
    stopped_early = False

    for epoch in range(1, cfg.max_epochs + 1):
        loss_sum = _train_epoch(model, opt, x_tr, y_tr, gen, epoch, cfg)
        model.eval()
        val_loss = float(_mean_ce(model, x_va, y_va))  # one host sync per epoch
        train_hist.append(float(loss_sum) / x_tr.shape[0])
        val_hist.append(val_loss)
        if val_loss < best_loss:  # NaN never counts as an improvement
            best_loss, best_epoch = val_loss, epoch
            best_state = _state_copy(model)
        elif epoch - best_epoch >= cfg.patience:
            stopped_early = epoch < cfg.max_epochs
            break

    model.load_state_dict(best_state)
    return {
        "epochs": len(val_hist),
        "best_epoch": best_epoch,
        "best_val_loss": best_loss,
        "stopped_early": stopped_early,
        "train_loss": train_hist,
        "val_loss": val_hist,
    }


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_epoch(
    model: torch.nn.Linear,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    epoch: int,
    cfg: ProbeConfig,
) -> torch.Tensor:
    """Epoch `epoch` (1-based): one pass over the rows of `x` in an order drawn from `gen`, the
    learning rate on its cosine from cfg.lr to 0 over all cfg.max_epochs. The summed loss stays a
    device tensor: reading it waits for the device, which the validation loss does anyway."""
    model.train()
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.max_epochs * steps_per_epoch
    perm = torch.randperm(n, generator=gen).to(x.device)
    loss_sum = x.new_zeros(())
    for step, i in enumerate(range(0, n, cfg.batch_size), start=(epoch - 1) * steps_per_epoch):
        idx = perm[i : i + cfg.batch_size]
        lr = 0.5 * cfg.lr * (1.0 + math.cos(math.pi * step / total_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * idx.shape[0]
    return loss_sum


def _settings(cfg: ProbeConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def run_probe(
    splits: dict[str, ProbeSplit],
    class_names: list[str],
    cfg: ProbeConfig,
    device: torch.device | str = "cpu",
    on_model: Callable[[int, torch.nn.Linear], None] | None = None,
) -> dict:
    """Train one probe per seed in cfg.seeds on splits['train'] (early stopping on 'val'),
    score it on 'test' and on 'val', run the kNN probe on the same splits, and return a
    JSON-ready summary.

    Metrics are fractions in [0, 1]: macro-F1 over ALL classes in `class_names`
    (zero_division=0, so a class never predicted scores 0), balanced accuracy and accuracy.
    The val scores (`val_*`) are there to choose settings on; the test scores to report.
    The confusion matrix (test) is summed over seeds, rows = true class, columns = predicted.
    `knn` holds the kNN probe's scores (usjepa.eval.knn.knn_probe). `on_model(seed, model)`
    sees each seed's trained probe (the bench scores it again on other test views).
    """
    num_classes = _check_probe_splits(splits, class_names, cfg)
    train, val, test = splits["train"], splits["val"], splits["test"]
    _check_test_classes(train, test, class_names)

    cm_total = np.zeros((num_classes, num_classes), dtype=np.int64)
    per_seed = []
    for seed in cfg.seeds:
        model, hist = train_probe(train, val, num_classes, seed, cfg, device)
        if on_model is not None:
            on_model(int(seed), model)
        record, confusion = _scored_seed(model, hist, int(seed), val, test, num_classes, device)
        cm_total += confusion
        per_seed.append(record)

    return {
        "per_seed": per_seed,
        **_means_and_sds(per_seed),
        "std_ddof": 0,
        "knn": knn_probe(splits, num_classes, cfg, device),
        "confusion_matrix": cm_total.tolist(),
        "class_names": list(class_names),
        "num_features": int(train.features.shape[1]),
        "counts": {name: len(splits[name]) for name in SPLITS},
        "settings": _settings(cfg),
    }


def _check_probe_splits(splits: dict[str, ProbeSplit], class_names: list[str], cfg: ProbeConfig) -> int:
    """The number of classes, once every split, the seeds and the classes are usable."""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise UserError(f"run_probe needs the splits train, val and test; missing: {', '.join(missing)}")
    if not cfg.seeds:
        raise UserError("probe.seeds is empty; give at least one seed")
    num_classes = len(class_names)
    if num_classes < 2:
        raise UserError(f"the probe needs at least 2 classes, got {num_classes}: {class_names}")

    for name in SPLITS:  # empty splits first, so the message names the split
        if len(splits[name]) == 0:
            raise UserError(_empty_msg(name))
    dim = splits["train"].features.shape[1]
    for name in SPLITS:
        _check_split(name, splits[name], num_classes, dim)
    return num_classes


def _check_test_classes(train: ProbeSplit, test: ProbeSplit, class_names: list[str]) -> None:
    """A test class never seen in training is an error; a class missing from test, a warning."""
    seen = set(np.unique(train.labels).tolist())
    unseen = sorted(set(np.unique(test.labels).tolist()) - seen)
    if unseen:
        names = ", ".join(f"{class_names[c]!r} ({c})" for c in unseen)
        raise UserError(f"the test split has classes that never occur in train: {names}")
    absent = sorted(set(range(len(class_names))) - set(np.unique(test.labels).tolist()))
    if absent:
        warnings.warn(
            f"classes absent from the test split: {[class_names[c] for c in absent]}; macro-F1 "
            "averages over all classes, so each of them counts as F1 0",
            stacklevel=3,  # the caller of run_probe
        )


def _scored_seed(
    model: torch.nn.Linear,
    hist: dict,
    seed: int,
    val: ProbeSplit,
    test: ProbeSplit,
    num_classes: int,
    device: torch.device | str,
) -> tuple[dict, np.ndarray]:
    """The seed's row of `per_seed` (test and val scores, training summary) and its test
    confusion matrix."""
    pred = predict(model, test.features, device)
    confusion = confusion_matrix(test.labels, pred, labels=list(range(num_classes)))
    val_scores = scores(val.labels, predict(model, val.features, device), num_classes)
    record = {
        "seed": seed,
        **scores(test.labels, pred, num_classes),
        "val_macro_f1": val_scores["macro_f1"],
        "val_balanced_accuracy": val_scores["balanced_accuracy"],
        "best_epoch": int(hist["best_epoch"]),
        "epochs": int(hist["epochs"]),
        "best_val_loss": float(hist["best_val_loss"]),
    }
    return record, confusion


def _means_and_sds(per_seed: list[dict]) -> dict[str, float]:
    """`{score}_mean` and `{score}_std` over the seeds of each reported score; the sd is the
    population one (numpy ddof=0)."""
    summary = {}
    for key in ("macro_f1", "balanced_accuracy", "val_macro_f1"):
        values = np.array([r[key] for r in per_seed])
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std(ddof=0))
    return summary
