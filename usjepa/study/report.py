"""The study's numbers: per arm and task, mean +- sd over pretraining seeds x probe seeds of
the linear probe (and over pretraining seeds of the kNN probe), the compute each arm spent,
and the stated comparisons, as results.json, table.md and the printed summary."""

from __future__ import annotations

import json

import numpy as np

from usjepa import rundir
from usjepa.fileio import atomic_write_text
from usjepa.study.jobs import job_seconds, write_json
from usjepa.study.plan import Paths
from usjepa.study.spec import StudySpec


def _stats(values: list[float]) -> dict:
    a = 100 * np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=0)), "n": int(a.size)}


def _reports(spec: StudySpec, paths: Paths, name: str, task: str) -> list[dict]:
    """The probe reports of arm or baseline `name` on `task`, one per pretraining seed."""
    if name in spec.arms:
        backbone = spec.arms[name].probe
        files = [paths.probe(name, task, seed) / f"{backbone}.json" for seed in spec.seeds]
    else:
        files = [paths.probe(name, task) / f"{name}.json"]
    return [json.loads(f.read_text()) for f in files]


def _scores(reports: list[dict]) -> dict:
    seeds = [s for r in reports for s in r["per_seed"]]
    return {
        "linear_macro_f1": _stats([s["macro_f1"] for s in seeds]),
        "linear_balanced_accuracy": _stats([s["balanced_accuracy"] for s in seeds]),
        "linear_val_macro_f1": _stats([s["val_macro_f1"] for s in seeds]),
        # between pretraining seeds only: what retraining the encoder changes
        "linear_macro_f1_by_pretraining_seed": [100 * r["macro_f1_mean"] for r in reports],
        "knn_macro_f1": _stats([r["knn"]["macro_f1"] for r in reports]),
        "knn_val_macro_f1": _stats([r["knn"]["val_macro_f1"] for r in reports]),
    }


def _compute(spec: StudySpec, paths: Paths, arm: str, seconds: dict[str, float]) -> dict:
    """Model FLOPs and wall time of training an arm, mean per seed, alone and with its teacher."""
    a = spec.arms[arm]
    if a.probe == "random":
        return {"gflops": 0.0, "gflops_with_teacher": 0.0, "train_minutes": 0.0, "train_minutes_with_teacher": 0.0}
    flops = [
        rundir.read_meta(rundir.latest_checkpoint(paths.run(arm, s)))["counters"]["flops"] / 1e9 for s in spec.seeds
    ]
    minutes = [seconds.get(f"train/{arm}/seed{s}", 0.0) / 60 for s in spec.seeds]
    own = {"gflops": float(np.mean(flops)), "train_minutes": float(np.mean(minutes))}
    teacher = (
        _compute(spec, paths, a.teacher, seconds)
        if a.teacher
        else {"gflops_with_teacher": 0.0, "train_minutes_with_teacher": 0.0}
    )
    return {
        **own,
        "gflops_with_teacher": own["gflops"] + teacher["gflops_with_teacher"],
        "train_minutes_with_teacher": own["train_minutes"] + teacher["train_minutes_with_teacher"],
    }


def _compare(results: dict, a: str, b: str, task: str) -> dict:
    x, y = results[a]["tasks"][task]["linear_macro_f1"], results[b]["tasks"][task]["linear_macro_f1"]
    kx, ky = results[a]["tasks"][task]["knn_macro_f1"], results[b]["tasks"][task]["knn_macro_f1"]
    diff, spread = x["mean"] - y["mean"], x["sd"] + y["sd"]
    return {
        "task": task,
        "a": a,
        "b": b,
        "linear_difference": diff,
        "spread": spread,
        "holds": diff > spread,
        "knn_difference": kx["mean"] - ky["mean"],
    }


def collect(spec: StudySpec, paths: Paths) -> dict:
    seconds = job_seconds(paths.out)
    results = {}
    for name in [*spec.arms, *spec.baselines]:
        entry = {"tasks": {task: _scores(_reports(spec, paths, name, task)) for task in spec.tasks}}
        if name in spec.arms:
            entry["compute"] = _compute(spec, paths, name, seconds)
            entry["probe"] = spec.arms[name].probe
        results[name] = entry
    comparisons = [_compare(results, a, b, task) for a, b in spec.compare for task in spec.tasks]
    return {
        "results": results,
        "comparisons": comparisons,
        "seeds": list(spec.seeds),
        "probe_seeds": list(spec.probe_seeds),
        "image_size": spec.image_size,
        "corpus": list(spec.corpus),
        "tasks": dict(spec.tasks),
    }


def _cell(s: dict) -> str:
    return f"{s['mean']:.1f} ± {s['sd']:.1f}"


def tables(spec: StudySpec, summary: dict) -> str:
    """Markdown: one table per score (tasks as columns, compute at the right), then the comparisons."""
    results, tasks = summary["results"], list(spec.tasks)
    out = []
    for metric, title in (
        ("linear_macro_f1", "linear probe macro-F1 (%)"),
        ("knn_macro_f1", "kNN macro-F1 (%)"),
        ("linear_balanced_accuracy", "linear probe balanced accuracy (%)"),
        ("linear_val_macro_f1", "linear probe macro-F1 on val (%), what settings are chosen on"),
    ):
        head = ["backbone", *tasks, "GFLOPs (with teacher)", "train min (with teacher)"]
        rows = [head, ["---"] * len(head)]
        for name, entry in results.items():
            c = entry.get("compute")
            rows.append(
                [
                    name,
                    *(_cell(entry["tasks"][t][metric]) for t in tasks),
                    f"{c['gflops']:.0f} ({c['gflops_with_teacher']:.0f})" if c else "-",
                    f"{c['train_minutes']:.1f} ({c['train_minutes_with_teacher']:.1f})" if c else "-",
                ]
            )
        out += [f"**{title}**", "", *("| " + " | ".join(r) + " |" for r in rows), ""]
    if summary["comparisons"]:
        out += ["**comparisons** (linear macro-F1 difference; holds: larger than the sum of the two sds)", ""]
        for c in summary["comparisons"]:
            verdict = "holds" if c["holds"] else "does not hold"
            out.append(
                f"- {c['a']} vs {c['b']} on {c['task']}: {c['linear_difference']:+.1f} "
                f"(spread {c['spread']:.1f}, {verdict}); kNN {c['knn_difference']:+.1f}"
            )
        out.append("")
    seeds = f"{len(spec.seeds)} pretraining seed(s) x {len(spec.probe_seeds)} probe seeds"
    out.append(
        f"mean ± sd over {seeds} (kNN: over pretraining seeds); {spec.image_size} px; "
        f"pretrained on {' + '.join(spec.corpus)}"
    )
    return "\n".join(out) + "\n"


def write_report(spec: StudySpec, paths: Paths) -> str:
    summary = collect(spec, paths)
    write_json(paths.out / "results.json", summary)
    text = tables(spec, summary)
    atomic_write_text(paths.out / "table.md", text)
    return text
