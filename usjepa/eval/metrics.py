"""The scores every probe reports, from sklearn."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score


def scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Macro-F1 over ALL `num_classes` classes (zero_division=0, so a class never predicted
    scores 0), balanced accuracy and accuracy, as fractions in [0, 1]."""
    labels = list(range(num_classes))
    f1 = f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
        warnings.simplefilter("ignore", UserWarning)
        bal = balanced_accuracy_score(y_true, y_pred)
    return {"macro_f1": float(f1), "balanced_accuracy": float(bal), "accuracy": float(accuracy_score(y_true, y_pred))}
