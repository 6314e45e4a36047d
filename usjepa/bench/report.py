"""The bench's results.json as tables (table.md, table.csv, the terminal summary) and plots.

Tables have one row per backbone (in the order of `results`) and one column per dataset (in
the order datasets first appear); cells are test macro-F1 in %, "–" where a cell is missing.
The best mean of each column is marked; the US-JEPA paper's rows, shown below ours where a
column is one of its datasets, are never marked.

table.csv holds the linear-probe table, machine-readable: the columns are `backbone`,
`source` ("bench" for our rows, "paper" for the paper's, whose `backbone` is the paper's model
name), then `<dataset>_mean` and `<dataset>_std` for each dataset (percent, two decimals; empty
where missing; the paper gives no sd), then `best_in`: the datasets where the row has the
best mean, separated by ";" (empty for none and for paper rows).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from usjepa.bench.paper import PAPER_MACRO_F1, paper_dataset
from usjepa.eval.report import write_confusion_plot
from usjepa.fileio import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# backbone -> dataset -> protocol -> result, as in results.json
Results = dict[str, dict[str, dict]]

MISSING = "–"


@dataclass(frozen=True)
class _Protocol:
    path: tuple[str, ...]  # where its result sits in a (backbone, dataset) cell
    spread: bool  # cells "mean ± sd" (a result per probe seed) or the mean alone (one run)


LINEAR = _Protocol(("linear",), spread=True)
KNN = _Protocol(("knn",), spread=False)
VIDEO = _Protocol(("video", "linear"), spread=True)


@dataclass(frozen=True)
class _Row:
    label: str
    cells: list[str]  # one per dataset
    best: list[bool]  # one per dataset


# ----------------------------------------------------------------------------- the numbers


def _datasets(results: Results) -> list[str]:
    return list(dict.fromkeys(d for cells in results.values() for d in cells))


def _entry(cell: dict, path: tuple[str, ...]) -> dict | None:
    for key in path:
        cell = cell.get(key)
        if cell is None:
            return None
    return cell


def _grid(results: Results, protocol: _Protocol) -> dict[str, dict[str, dict]]:
    """backbone -> dataset -> the protocol's result, for the cells that have one."""
    return {
        b: {d: e for d, cell in cells.items() if (e := _entry(cell, protocol.path)) is not None}
        for b, cells in results.items()
    }


def _best(grid: dict[str, dict[str, dict]]) -> dict[str, set[str]]:
    """dataset -> the backbones with its highest mean (all of them on an exact tie)."""
    top: dict[str, float] = {}
    best: dict[str, set[str]] = {}
    for b, row in grid.items():
        for d, e in row.items():
            m = e["macro_f1_mean"]
            if d not in top or m > top[d]:
                top[d], best[d] = m, {b}
            elif m == top[d]:
                best[d].add(b)
    return best


def _distinct(values: Iterable) -> str:
    """'5' when every result agrees, '3, 5' when they differ (a partly rerun bench)."""
    found = sorted(set(values))
    return ", ".join(map(str, found)) if found else MISSING


def _seed_counts(grid: dict[str, dict[str, dict]]) -> str:
    return _distinct(len(e.get("per_seed", [])) for row in grid.values() for e in row.values())


def _field(grid: dict[str, dict[str, dict]], key: str) -> str:
    return _distinct(e[key] for row in grid.values() for e in row.values() if key in e)


# ----------------------------------------------------------------------------- rows


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def _cell(e: dict, spread: bool) -> str:
    mean = _pct(e["macro_f1_mean"])
    return f"{mean} ± {_pct(e['macro_f1_std'])}" if spread else mean


def _rows(results: Results, protocol: _Protocol, datasets: list[str]) -> list[_Row]:
    grid = _grid(results, protocol)
    best = _best(grid)
    return [
        _Row(
            b,
            [_cell(grid[b][d], protocol.spread) if d in grid[b] else MISSING for d in datasets],
            [b in best.get(d, ()) for d in datasets],
        )
        for b in results
    ]


def _paper_rows(datasets: list[str]) -> list[_Row]:
    """The paper's rows over our columns; none when no column is one of its datasets."""
    keys = [paper_dataset(d) for d in datasets]
    if not any(keys):
        return []
    return [
        _Row(f"paper: {model}", [f"{scores[k]:.1f}" if k else MISSING for k in keys], [False] * len(keys))
        for model, scores in PAPER_MACRO_F1.items()
    ]


# ----------------------------------------------------------------------------- table.md


def _md_table(datasets: list[str], rows: list[_Row]) -> list[str]:
    lines = ["| backbone | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for r in rows:
        cells = [f"**{c}**" if best else c for c, best in zip(r.cells, r.best)]
        lines.append("| " + " | ".join([r.label, *cells]) + " |")
    return lines


def _linear_md(results: Results, datasets: list[str]) -> list[str]:
    paper = _paper_rows(datasets)
    heading = (
        f"**Linear probe**: test macro-F1 (%), mean ± sd over {_seed_counts(_grid(results, LINEAR))} "
        "probe seeds; best of each column in bold"
    )
    if paper:
        heading += '; "paper:" rows are the US-JEPA paper (2026), mean of 5 seeds, not ranked'
    return [heading, "", *_md_table(datasets, [*_rows(results, LINEAR, datasets), *paper])]


def _knn_md(results: Results, datasets: list[str]) -> list[str]:
    heading = (
        f"**kNN probe** (k = {_field(_grid(results, KNN), 'k')}): test macro-F1 (%), one deterministic "
        "run; best of each column in bold"
    )
    return [heading, "", *_md_table(datasets, _rows(results, KNN, datasets))]


def _video_md(results: Results, datasets: list[str]) -> list[str]:
    grid = _grid(results, VIDEO)
    # Only the datasets whose test split has videos: the others would be all "–".
    columns = [d for d in datasets if any(d in row for row in grid.values())]
    heading = (
        "**Video-level linear probe** (frame probabilities combined per video by rule: "
        f"{_field(grid, 'rule')}): test macro-F1 (%) over videos, mean ± sd over {_seed_counts(grid)} "
        "probe seeds; best of each column in bold"
    )
    return [heading, "", *_md_table(columns, _rows(results, VIDEO, columns))]


def _markdown(results: Results) -> str:
    datasets = _datasets(results)
    sections = [_linear_md(results, datasets), _knn_md(results, datasets)]
    if any(_grid(results, VIDEO).values()):
        sections.append(_video_md(results, datasets))
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


# ----------------------------------------------------------------------------- table.csv


def _csv_pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def _csv_text(results: Results) -> str:
    datasets = _datasets(results)
    grid = _grid(results, LINEAR)
    best = _best(grid)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["backbone", "source", *(f"{d}_{stat}" for d in datasets for stat in ("mean", "std")), "best_in"])
    for b, row in grid.items():
        values = [
            v
            for d in datasets
            for v in ((_csv_pct(row[d]["macro_f1_mean"]), _csv_pct(row[d]["macro_f1_std"])) if d in row else ("", ""))
        ]
        w.writerow([b, "bench", *values, ";".join(d for d in datasets if b in best.get(d, ()))])
    keys = [paper_dataset(d) for d in datasets]
    if any(keys):
        for model, scores in PAPER_MACRO_F1.items():
            values = [v for k in keys for v in (str(scores[k]) if k else "", "")]
            w.writerow([model, "paper", *values, ""])
    return buf.getvalue()


def write_tables(results: Results, out: Path) -> tuple[Path, Path]:
    """Write OUT/table.md (linear, kNN and, where any exist, video-level tables) and
    OUT/table.csv (the linear table; layout in the module docstring), each atomically.
    Returns (md_path, csv_path)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = atomic_write_text(out / "table.md", _markdown(results))
    table = atomic_write_text(out / "table.csv", _csv_text(results))
    return md, table


# ----------------------------------------------------------------------------- terminal


def format_summary(results: Results) -> str:
    """The linear-probe table as aligned plain text; '*' marks the best of each column."""
    datasets = _datasets(results)
    paper = _paper_rows(datasets)
    rows = [*_rows(results, LINEAR, datasets), *paper]
    # Every cell ends in a marker column ('*' or ' '), so the numbers stay aligned.
    table = [["backbone", *(f"{d} " for d in datasets)]]
    table += [[r.label, *(c + ("*" if best else " ") for c, best in zip(r.cells, r.best))] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))])

    title = "linear probe: test macro-F1 (%), mean ± sd over probe seeds; * best of the column"
    if paper:
        title += " (paper rows: the US-JEPA paper (2026), not ranked)"
    return "\n".join([title, line(table[0]), "  ".join("-" * w for w in widths), *map(line, table[1:])])


# ----------------------------------------------------------------------------- plots


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _figure(width: float, height: float) -> Figure:
    # A Figure with its own Agg canvas, not pyplot: no display, no change to the process's
    # backend, and no global figure registry, so a figure is freed with its last reference
    # (there is nothing to plt.close).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _curve(ax: Axes, points: list[tuple[float, dict]], color: str, label: str) -> None:
    """Mean macro-F1 (%) against x, with a band of ± one sd."""
    x = [p for p, _ in points]
    mean = [100 * e["macro_f1_mean"] for _, e in points]
    sd = [100 * e["macro_f1_std"] for _, e in points]
    ax.plot(x, mean, marker="o", color=color, label=label)
    ax.fill_between(x, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color, alpha=0.2)


def _bar_plot(results: Results, dataset: str, colors: dict[str, str]) -> Figure | None:
    ours = [(b, cells[dataset]["linear"]) for b, cells in results.items() if "linear" in cells.get(dataset, {})]
    if not ours:
        return None
    key = paper_dataset(dataset)
    paper = [(f"paper: {model}", scores[key]) for model, scores in PAPER_MACRO_F1.items()] if key else []
    fig = _figure(max(4.0, 0.6 * (len(ours) + len(paper)) + 2), 4.5)
    ax = fig.add_subplot()
    ax.bar(
        range(len(ours)),
        [100 * e["macro_f1_mean"] for _, e in ours],
        yerr=[100 * e["macro_f1_std"] for _, e in ours],
        capsize=3,
        color=[colors[b] for b, _ in ours],
    )
    if paper:
        ax.bar(
            range(len(ours), len(ours) + len(paper)),
            [v for _, v in paper],
            color="0.85",
            hatch="//",
            edgecolor="0.4",
            label="US-JEPA paper (2026), mean of 5 seeds",
        )
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(range(len(ours) + len(paper)), [b for b, _ in ours] + [m for m, _ in paper], rotation=30, ha="right")
    ax.set_ylabel("test macro-F1 (%)")
    ax.set_title(f"{dataset}: linear probe, mean ± sd over probe seeds", fontsize=10)
    return fig


def _fewshot_plot(results: Results, dataset: str, colors: dict[str, str]) -> Figure | None:
    curves = {b: cells[dataset]["fewshot"] for b, cells in results.items() if cells.get(dataset, {}).get("fewshot")}
    if not curves:
        return None
    fig = _figure(5.5, 4.0)
    ax = fig.add_subplot()
    for b, by_fraction in curves.items():
        _curve(ax, sorted((float(f), e) for f, e in by_fraction.items()), colors[b], b)
    ax.set_xscale("log")
    # the fractions themselves as ticks: log decades alone hide which fractions were run
    fractions = sorted({float(f) for by_fraction in curves.values() for f in by_fraction})
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel("test macro-F1 (%)")
    ax.set_title(f"{dataset}: few-shot linear probe, mean ± sd over probe seeds", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _robustness_plot(results: Results, dataset: str, colors: dict[str, str]) -> Figure | None:
    curves = {
        b: cells[dataset]["robustness"] for b, cells in results.items() if cells.get(dataset, {}).get("robustness")
    }
    if not curves:
        return None
    kinds = list(dict.fromkeys(kind for by_kind in curves.values() for kind in by_kind))
    fig = _figure(3.8 * len(kinds), 3.8)
    axes = fig.subplots(1, len(kinds), squeeze=False, sharey=True)[0]
    for ax, kind in zip(axes, kinds):
        for b, by_kind in curves.items():
            if kind in by_kind:
                _curve(ax, sorted((int(s), e) for s, e in by_kind[kind].items()), colors[b], b)
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("severity")
        ax.set_xticks(sorted({int(s) for by_kind in curves.values() for s in by_kind.get(kind, {})}))
    axes[0].set_ylabel("test macro-F1 (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{dataset}: linear probe on corrupted test images", fontsize=10)
    return fig


def _confusion_plots(results: Results, plots: Path) -> list[Path]:
    """confusion_<backbone>_<dataset>.png for every linear result with a confusion matrix."""
    return [
        write_confusion_plot(c["linear"], plots / f"confusion_{_safe(b)}_{_safe(d)}.png", f"{b} on {d}")
        for b, by_dataset in results.items()
        for d, c in by_dataset.items()
        if "confusion_matrix" in c.get("linear", {})
    ]


def write_plots(results: Results, out: Path) -> list[Path]:
    """PNGs under OUT/plots/: bar_<dataset> (linear probe per backbone, the paper's numbers
    hatched beside), fewshot_<dataset> and robustness_<dataset> where those protocols have
    results, confusion_<backbone>_<dataset> per linear result. Returns the written paths."""
    plots = Path(out) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    # One colour per backbone across every plot.
    colors = {b: f"C{i % 10}" for i, b in enumerate(results)}
    written = []
    for dataset in _datasets(results):
        for kind, draw in (("bar", _bar_plot), ("fewshot", _fewshot_plot), ("robustness", _robustness_plot)):
            fig = draw(results, dataset, colors)
            if fig is not None:
                written.append(_save(fig, plots / f"{kind}_{_safe(dataset)}.png"))
    return written + _confusion_plots(results, plots)
