"""What a study runs, as paths and jobs: shard sets built from recipes, one training run per
(arm, seed), one probe per (arm, seed, task) and per (baseline, task).

Layout under `out`:
    shards/<set>/                      the shard sets, built at the study's image size
    runs/<arm>/seed<k>/                 run dirs (TensorBoard, checkpoints)
    probe/<arm>/seed<k>/<task>/<backbone>.json, probe/<baseline>/<task>/<baseline>.json
    logs/<job>.log, jobs.jsonl          each job's output and wall time
    results.json, table.md              written by the report
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from usjepa import rundir
from usjepa.config import load_config
from usjepa.ingest.build.run import build_shards
from usjepa.ingest.recipes import load_recipe
from usjepa.study.jobs import Job
from usjepa.study.spec import StudySpec


@dataclasses.dataclass(frozen=True)
class Paths:
    out: Path

    def shards(self, name: str) -> Path:
        return self.out / "shards" / name

    def run(self, arm: str, seed: int) -> Path:
        return self.out / "runs" / arm / f"seed{seed}"

    def probe(self, arm: str, task: str, seed: int | None = None) -> Path:
        """The folder of the probe reports of `arm` (or a baseline, seed None) on `task`."""
        base = self.out / "probe" / arm
        return (base if seed is None else base / f"seed{seed}") / task


def build_shard_sets(spec: StudySpec, paths: Paths, say=print) -> None:
    """Every shard set of the study from its recipe at the study's image size (a built one,
    with its manifest, is kept; an interrupted build resumes)."""
    for name, entry in spec.shard_sets.items():
        out = paths.shards(name)
        if (out / "manifest.json").is_file():
            continue
        say(f"building shard set {name} from {entry.recipe} -> {out}")
        src, settings, _ = load_recipe(entry.recipe, {**spec.vars, **entry.vars})
        build_shards(
            src, out, dataclasses.replace(settings, image_size=spec.image_size), progress=False, workers=spec.jobs
        )


def _train_overrides(spec: StudySpec, paths: Paths, arm: str, seed: int) -> list[str]:
    a = spec.arms[arm]
    mixture = ", ".join(f"{{shards: {paths.shards(name)}}}" for name in spec.corpus)
    study = [
        f"run.dir={paths.run(arm, seed)}",
        f"run.seed={seed}",
        "run.threads=1",
        "data.num_workers=0",
        "data.shards=",
        f"data.mixture=[{mixture}]",
        f"data.image_size={spec.image_size}",
        "log.progress=false",
    ]
    if a.teacher:
        study.append(f"teacher.checkpoint={paths.run(a.teacher, seed)}")
    if spec.steps:
        cfg = load_config(a.config, [*a.overrides, *spec.train_overrides])
        study += [
            f"train.total_steps={spec.steps}",
            f"optim.warmup_steps={min(cfg.optim.warmup_steps, spec.steps // 10)}",
            f"checkpoint.every_steps={min(cfg.checkpoint.every_steps, spec.steps)}",
        ]
    return [*a.overrides, *spec.train_overrides, *study]


def _trained(config: str, overrides: list[str]) -> bool:
    cfg = load_config(config, overrides)
    latest = rundir.latest_checkpoint(Path(cfg.run.dir)) if Path(cfg.run.dir).is_dir() else None
    return latest is not None and rundir.read_meta(latest)["step"] >= cfg.train.total_steps


def _probe_job(
    spec: StudySpec, paths: Paths, key: str, run: Path, backbone: str, task: str, out: Path, after: list[str]
) -> Job:
    args = [
        "probe",
        str(run),
        "--backbone",
        backbone,
        "--shards",
        str(paths.shards(spec.tasks[task])),
        "--out",
        str(out),
        "--checkpoint",
        spec.checkpoint,
        f"probe.seeds=[{','.join(map(str, spec.probe_seeds))}]",
    ]
    return Job(key, args, done=lambda: (out / f"{backbone}.json").is_file(), after=after)


def plan_jobs(spec: StudySpec, paths: Paths) -> list[Job]:
    jobs = []
    trained = [a for a, arm in spec.arms.items() if arm.probe != "random"]
    for seed in spec.seeds:
        for arm in trained:
            a = spec.arms[arm]
            overrides = _train_overrides(spec, paths, arm, seed)
            after = [f"train/{a.teacher}/seed{seed}"] if a.teacher else []
            jobs.append(
                Job(
                    f"train/{arm}/seed{seed}",
                    ["train", a.config, *overrides],
                    done=lambda c=a.config, o=overrides: _trained(c, o),
                    after=after,
                )
            )
    for seed in spec.seeds:
        for arm, a in spec.arms.items():
            source = a.like if a.probe == "random" else arm
            for task in spec.tasks:
                jobs.append(
                    _probe_job(
                        spec,
                        paths,
                        f"probe/{arm}/seed{seed}/{task}",
                        paths.run(source, seed),
                        a.probe,
                        task,
                        paths.probe(arm, task, seed),
                        [f"train/{source}/seed{seed}"],
                    )
                )
    host = f"{trained[0]}/seed{spec.seeds[0]}"  # any run: baselines take only its image size and probe settings
    for baseline in spec.baselines:
        for task in spec.tasks:
            jobs.append(
                _probe_job(
                    spec,
                    paths,
                    f"probe/{baseline}/{task}",
                    paths.run(trained[0], spec.seeds[0]),
                    baseline,
                    task,
                    paths.probe(baseline, task),
                    [f"train/{host}"],
                )
            )
    return jobs
