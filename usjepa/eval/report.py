"""Probe results on disk (JSON + confusion-matrix PNG) and as a terminal table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from usjepa.errors import UserError
from usjepa.fileio import atomic_write, make_folder


def _jsonable(obj: Any) -> Any:
    """numpy -> Python; non-finite floats -> None, so the file is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def write_probe_report(result: dict, out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write OUT_DIR/<name>.json and OUT_DIR/<name>_confusion.png; return (json_path, png_path).

    `result` is what run_probe returns. Both files are written atomically (temp file +
    os.replace), so a reader never sees half a file. The PNG shows the confusion matrix
    summed over seeds (rows = true class) with the macro-F1 mean ± sd in the title.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise UserError(f"report name must be a plain file name without '/', got {name!r}")
    out = Path(out_dir)
    make_folder(out, "the report folder", "choose another folder for the reports (--out)")

    json_path = out / f"{name}.json"
    png_path = out / f"{name}_confusion.png"

    text = json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n"
    atomic_write(json_path, lambda f: f.write(text.encode("utf-8")))
    write_confusion_plot(result, png_path, name)
    return json_path, png_path


def write_confusion_plot(result: dict, path: Path, title: str) -> Path:
    """`path` (PNG, written atomically): the confusion matrix of a linear-probe `result`
    (summed over seeds, rows = true class), titled `title` and the macro-F1 mean ± sd."""
    # Figure + Agg canvas directly: no pyplot state, no change to the process's backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(result["confusion_matrix"], dtype=np.int64)
    class_names = list(result.get("class_names") or range(cm.shape[0]))
    k = cm.shape[0]
    side = max(4.5, 0.6 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(cm, display_labels=class_names).plot(
        ax=ax,
        cmap="Blues",
        colorbar=True,
        values_format="d",
        xticks_rotation=45 if k > 4 else "horizontal",
    )
    n_seeds = len(result.get("per_seed", [])) or "?"
    ax.set_title(
        f"{title}: macro-F1 {_pct(result['macro_f1_mean'], result['macro_f1_std'])}%\n"
        f"(confusion summed over {n_seeds} seeds)",
        fontsize=10,
    )
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


# Columns shown when any result carries them (results written before they existed do not):
# (header, the result key, the cell).
_OPTIONAL_COLUMNS = (
    ("val macro-F1 (%)", "val_macro_f1_mean", lambda r: _pct(r["val_macro_f1_mean"], r["val_macro_f1_std"])),
    ("kNN macro-F1 (%)", "knn", lambda r: f"{100 * r['knn']['macro_f1']:.1f}"),
)


def format_table(results: dict[str, dict]) -> str:
    """Plain-text table, one row per backbone: the linear probe's test macro-F1 and balanced
    accuracy as mean ± sd in %, its val macro-F1 and the kNN probe's test macro-F1 (columns
    present when a result has them; '-' for a result without), and the number of seeds."""
    optional = [c for c in _OPTIONAL_COLUMNS if any(c[1] in r for r in results.values())]
    header = ("backbone", "macro-F1 (%)", "bal. acc (%)", *(c[0] for c in optional), "seeds")
    rows = [header]
    for name, r in results.items():
        rows.append(
            (
                str(name),
                _pct(r["macro_f1_mean"], r["macro_f1_std"]),
                _pct(r["balanced_accuracy_mean"], r["balanced_accuracy_std"]),
                *(cell(r) if key in r else "-" for _, key, cell in optional),
                str(len(r.get("per_seed", []))),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def fmt(row):
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest])

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in rows[1:]]
    return "\n".join(lines)
