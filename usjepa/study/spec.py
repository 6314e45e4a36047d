"""The study spec: typed, validated like a run config (unknown keys fail with a suggestion,
dotted `key=value` overrides work on it, e.g. `out=/tmp/s` or `arms.salt.overrides=[...]`)."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from usjepa.config import load_typed, require
from usjepa.eval.baselines import BASELINES


@dataclass
class ShardSetSpec:
    recipe: str  # an ingest recipe, e.g. shards/busi.yaml
    vars: dict[str, str] = field(default_factory=dict)  # its placeholders, over the study's `vars`


@dataclass
class ArmSpec:
    # The run config to train with, and overrides of it. The study sets run.dir, run.seed, the
    # data (data.mixture of the corpus) and, for `teacher`, teacher.checkpoint.
    config: str = ""
    overrides: tuple[str, ...] = ()
    teacher: str = ""  # the arm whose run of the same seed is this arm's frozen teacher
    # What is probed: the trained encoder (student), the EMA target (target), or `random`: the
    # initial weights of arm `like` (its architecture and seed), which is then not trained again.
    probe: typing.Literal["student", "target", "random"] = "student"
    like: str = ""


@dataclass
class StudySpec:
    out: str = "study_out"
    image_size: int = 64  # every shard set is built at this size
    # Placeholders of the recipes (paths of the raw data); a shard set's own vars win.
    vars: dict[str, str] = field(default_factory=dict)
    shard_sets: dict[str, ShardSetSpec] = field(default_factory=dict)
    corpus: tuple[str, ...] = ()  # shard sets mixed for pretraining, by their manifest weights
    tasks: dict[str, str] = field(default_factory=dict)  # task name -> labelled shard set
    arms: dict[str, ArmSpec] = field(default_factory=dict)
    baselines: tuple[str, ...] = BASELINES  # non-learned backbones, probed once per task
    seeds: tuple[int, ...] = (0, 1)  # pretraining seeds (run.seed)
    probe_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    checkpoint: typing.Literal["latest", "best"] = "latest"  # which checkpoint of each run is probed
    steps: int = 0  # > 0: every arm trains this many steps instead of its config's (quick runs)
    # Run-config overrides for every arm, after its own (a variant of the whole study, e.g.
    # `train_overrides=[predictor.layout=per_block]`).
    train_overrides: tuple[str, ...] = ()
    jobs: int = 2  # training and probe processes at a time, one CPU thread each
    # Pairs (a, b) whose difference the report states per task, e.g. [salt, random].
    compare: tuple[tuple[str, str], ...] = ()


def validate_study(spec: StudySpec) -> StudySpec:
    arms, sets = spec.arms, spec.shard_sets
    require(bool(spec.corpus), "corpus", "name at least one shard set to pretrain on")
    require(bool(arms), "arms", "name at least one arm")
    require(bool(spec.tasks), "tasks", "name at least one labelled task (task: shard set)")
    for name in spec.corpus:
        require(name in sets, "corpus", f"'{name}' is not one of shard_sets ({', '.join(sets)})")
    for task, name in spec.tasks.items():
        require(name in sets, f"tasks.{task}", f"'{name}' is not one of shard_sets ({', '.join(sets)})")
    for name, arm in arms.items():
        key = f"arms.{name}"
        if arm.probe == "random":
            require(
                arm.like in arms and arms[arm.like].probe != "random",
                f"{key}.like",
                "a random arm needs `like`: a trained arm whose architecture and seed it takes",
            )
        else:
            require(bool(arm.config), f"{key}.config", "a trained arm needs a run config")
            require(
                not arm.teacher or (arm.teacher in arms and arms[arm.teacher].probe != "random"),
                f"{key}.teacher",
                f"'{arm.teacher}' is not a trained arm",
            )
            require(arm.teacher != name, f"{key}.teacher", "an arm cannot be its own teacher")
    names = [*arms, *spec.baselines]
    for b in spec.baselines:
        require(b in BASELINES, "baselines", f"'{b}' is not one of {', '.join(BASELINES)}")
    for a, b in spec.compare:
        for x in (a, b):
            require(x in names, "compare", f"'{x}' is not an arm or baseline ({', '.join(names)})")
    require(len(spec.seeds) >= 1 and len(spec.probe_seeds) >= 1, "seeds", "needs at least one seed")
    require(spec.jobs >= 1, "jobs", "must be at least 1")
    require(spec.steps >= 0, "steps", "must be >= 0 (0: each config's train.total_steps)")
    return spec


def load_study(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> StudySpec:
    return validate_study(load_typed(StudySpec, Path(path), overrides, example="configs/study_real.yaml"))
