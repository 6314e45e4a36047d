"""A run directory: its resolved config, its checkpoints and the pointers to them, and where
a run's settings say it runs. Everything that reads a run (training, the teacher, probes,
export, bench) finds its parts here; writing a checkpoint is train/checkpoint.py's job.

Layout:
    resolved_config.yaml        the config the run was started with (rewritten on resume)
    checkpoints/step_000120/    DCP files of {"model", "optim"} (+ "target", the EMA encoder)
    checkpoints/step_000120/meta.json   step, samples seen, data position, RNG, teacher, and
                                the size and sha256 of every other file (written last)
    checkpoints/latest          the name of the newest complete checkpoint
    checkpoints/best            the one with the lowest validation loss (never pruned)
    checkpoints/damaged/        checkpoints a start found damaged (resume_checkpoint)
    tb/                         TensorBoard events
    .lock                       host and pid of the run that owns the dir (train/runlock.py)
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml

from usjepa.config import Config, changed_settings, dump_yaml, flatten, load_config, to_dict
from usjepa.errors import UserError
from usjepa.fileio import atomic_write_text, files_sha256

RESOLVED_CONFIG = "resolved_config.yaml"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_STEP_NAME = re.compile(r"^step_(\d+)$")
# Settings that may change between invocations of one run without changing its result.
RESUMABLE_CHANGES = (
    "run.stop_at_step",
    "run.threads",
    "run.device",
    "train.total_steps",
    "checkpoint.",
    "log.",
    "data.num_workers",
    "data.micro_batch_size",
    "probe.",
    "distributed.",
    "train.activation_checkpointing",
    "train.compile",
)


# Settings a resumed run cannot change: its weights, targets and data position depend on them.
UNRESUMABLE = (
    "model.",
    "predictor.",
    "teacher.",
    "train.objective",
    "data.image_size",
    "data.streams",
    "data.shards",
    "data.mixture",
    "data.split",
)


# Unresumable settings that name a file or folder: compared as the paths they resolve to, so
# `shards/x`, `shards/x/` and `/abs/shards/x` are the same setting. `[]`: each entry of a list.
PATH_SETTINGS = ("data.shards", "data.mixture[].shards", "teacher.checkpoint")
NO_PATH = ("", "none")  # values of path settings that name no file


def make_run_dir(run_dir: Path) -> list[Path]:
    """Create `run_dir` and its missing parents; returns the folders created, outermost first
    (what a refused start removes again)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.dir={run_dir} is a file; name a folder for the run (it is created)")
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"run.dir={run_dir}: cannot create it ({e.strerror}); choose a writable place") from None
    return missing[::-1]


def _same_paths(settings: dict) -> dict:
    """`settings` (a nested dict of a Config) with the PATH_SETTINGS resolved to absolute paths."""
    settings = copy.deepcopy(settings)

    def resolve(value: object) -> object:
        if not isinstance(value, str) or value.strip().lower() in NO_PATH:
            return value
        return str(Path(value).resolve())

    for key in PATH_SETTINGS:
        *parents, name = key.split(".")
        nodes = [settings]
        for part in parents:
            listed = part.endswith("[]")
            nodes = [n.get(part.removesuffix("[]")) for n in nodes if isinstance(n, dict)]
            if listed:
                nodes = [entry for n in nodes if isinstance(n, list) for entry in n]
        for node in nodes:
            if isinstance(node, dict) and name in node:
                node[name] = resolve(node[name])
    return settings


def run_drift(cfg: Config) -> list[str]:
    """The settings that differ from the config the run was started with (other than those in
    RESUMABLE_CHANGES; path settings compared as resolved paths); none for a new run dir.
    Reads only."""
    path = Path(cfg.run.dir) / RESOLVED_CONFIG
    if not path.is_file():
        return []
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(
            f"{path} cannot be read ({str(e).strip().splitlines()[0][:160]}); restore it, or start a new run.dir"
        ) from None
    if not isinstance(old, dict):
        old = {}
    changed = changed_settings(_same_paths(old), _same_paths(to_dict(cfg)))
    return [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]


def has_checkpoints(run_dir: Path) -> bool:
    """Whether a start of `run_dir` resumes (its `latest` pointer exists), whatever state its
    checkpoints are in: a start then may not change the UNRESUMABLE settings."""
    return (checkpoint_dir(run_dir) / "latest").is_file()


def refuse_unresumable(cfg: Config, drift: list[str]) -> None:
    """A resume that changes a setting in UNRESUMABLE is refused, naming each with both values."""
    refused = [k for k in drift if k.startswith(UNRESUMABLE)]
    if not refused:
        return
    old = flatten(yaml.safe_load((Path(cfg.run.dir) / RESOLVED_CONFIG).read_text()) or {})
    new = flatten(to_dict(cfg))
    changes = "; ".join(f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in refused)
    raise UserError(
        f"{cfg.run.dir} has checkpoints of other settings, which a resume cannot change ({changes}); "
        "restore them, or start a new run.dir"
    )


def write_resolved_config(cfg: Config) -> None:
    atomic_write_text(Path(cfg.run.dir) / RESOLVED_CONFIG, dump_yaml(cfg))


def cannot_write(what: str, why: str, resume_point: str) -> UserError:
    """A write into a run dir that failed (full disk, file-size limit, read-only), as one line."""
    return UserError(
        f"cannot write {what} ({why[:160]}); check the free disk space and file-size limit (ulimit -f), "
        f"then rerun: the run resumes from {resume_point}, which is intact"
    )


def is_run_dir(path: Path) -> bool:
    return (Path(path) / RESOLVED_CONFIG).is_file()


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The config run `run_dir` was started with, with dotted `overrides` applied."""
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: not a run dir (no {RESOLVED_CONFIG}); pass the run.dir of a `usjepa train` run")
    return load_config(Path(run_dir) / RESOLVED_CONFIG, overrides)


def resolve_device(setting: str) -> torch.device:
    """The device a `run.device`-style setting names: auto (CUDA where visible, else CPU), cpu,
    cuda or cuda:N."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"run.device={setting}: no CUDA device is visible; use run.device=cpu or auto")
    return device


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _step_dirs(run_dir: Path) -> list[Path]:
    """Every step dir, complete or not, oldest first: a step dir without meta.json is damaged
    (save_checkpoint renames a step into place only after its meta.json is written)."""
    root = checkpoint_dir(run_dir)
    return (
        sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=_step)
        if root.is_dir()
        else []
    )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with a meta.json), oldest first; not verified (checkpoint_problem)."""
    return [p for p in _step_dirs(run_dir) if (p / META).is_file()]


def _pointer(run_dir: Path, name: str) -> Path | None:
    """The step dir that pointer `name` (latest, best) names, whether it exists or not; None without one."""
    pointer = checkpoint_dir(run_dir) / name
    return checkpoint_dir(run_dir) / pointer.read_text().strip() if pointer.is_file() else None


def _is_step_dir(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) and path.is_dir()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint that `latest` names, unverified, or None for a fresh run. Training resumes
    through resume_checkpoint, which verifies it and repairs `latest`.

    A `latest` that names a missing checkpoint is an error, not a silent restart from step 0.
    """
    path = _pointer(run_dir, "latest")
    if path is not None and not (path / META).is_file():
        raise UserError(
            f"{checkpoint_dir(run_dir) / 'latest'} names {path.name}, which is missing or incomplete; "
            f"point it at one of {[p.name for p in list_checkpoints(run_dir)] or 'no checkpoints'} "
            "or remove it to start from scratch"
        )
    return path


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the lowest validation loss so far, if any was validated (unverified)."""
    path = _pointer(run_dir, "best")
    return path if path is not None and (path / META).is_file() else None


# --------------------------------------------------------------------------- integrity
def checkpoint_files(path: Path) -> dict[str, dict]:
    """{relative name: {"size", "sha256"}} of every file of step dir `path` but its meta.json:
    what save_checkpoint records in meta.json and checkpoint_problem checks."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p != path / META)
    return {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": files_sha256([p])} for p in files}


def _load_meta(path: Path) -> tuple[dict | None, str | None]:
    """(meta, None), or (None, why meta.json of step dir `path` cannot be used)."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except FileNotFoundError:
        return None, f"{META} is missing"
    except json.JSONDecodeError as e:
        return None, f"{META} is not valid JSON: {e}"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{META} is unreadable: {e}"
    return (meta, None) if isinstance(meta, dict) else (None, f"{META} is not a JSON object")


def checkpoint_problem(path: Path) -> str | None:
    """Why step dir `path` is not a usable checkpoint, in a few words, or None if it is intact.

    Reads every file the checkpoint lists (sizes first, then sha256): about a second per GB.
    Checkpoints written before integrity data was recorded have no "files" in meta.json; they
    count as intact when their meta.json parses, since there is nothing to check them against.
    """
    path = Path(path)
    meta, problem = _load_meta(path)
    if problem:
        return problem
    files = meta.get("files", {})
    try:
        for name, want in files.items():
            if not (path / name).is_file():
                return f"{name} is missing"
            if (size := (path / name).stat().st_size) != want["size"]:
                return f"{name} is {size} bytes, {META} says {want['size']}"
        for name, want in files.items():  # only once every size matches: hashing is the slow part
            if files_sha256([path / name]) != want["sha256"]:
                return f"{name} does not match its sha256 in {META}"
    except (AttributeError, KeyError, TypeError):
        return f'{META} has a malformed "files" entry'
    except OSError as e:
        return f"a file is unreadable: {e}"
    return None


def _newest_intact(dirs: list[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact one of step dirs `dirs` (oldest first) and the damaged ones newer than it."""
    damaged = []
    for path in reversed(dirs):
        if (problem := checkpoint_problem(path)) is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def _best_intact(candidates: list[Path]) -> Path | None:
    """The intact checkpoint with the lowest val_loss in its meta among `candidates`, if any was validated."""
    losses = {p: meta.get("val_loss") for p in candidates if (meta := _load_meta(p)[0]) is not None}
    ranked = sorted((loss, _step(p), p) for p, loss in losses.items() if isinstance(loss, (int, float)))
    return next((p for *_, p in ranked if checkpoint_problem(p) is None), None)


def _no_intact(run_dir: Path, damaged: list[tuple[Path, str]]) -> UserError:
    listed = "; ".join(f"{p.name} ({problem})" for p, problem in damaged)
    return UserError(
        f"{run_dir}: no intact checkpoint: {listed}; restore them, or move {checkpoint_dir(run_dir)} "
        "away to start from scratch"
    )


def _unique(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.{n}" if n > 1 else path.name).exists():
        n += 1
    return path.with_name(f"{path.name}.{n}" if n > 1 else path.name)


def resume_checkpoint(run_dir: Path, repair: bool) -> Path | None:
    """The newest intact checkpoint at or before the one `latest` names, to resume from; None
    for a fresh run (no `latest`).

    With `repair` (rank 0 of a start, before a barrier): each damaged checkpoint newer than it
    is moved to checkpoints/damaged/, with one line on stderr, and `latest` (and `best`, where it
    named a moved one) are rewritten to match. Without (the other ranks, after the barrier):
    the same choice, nothing written. No intact checkpoint at all is a UserError.
    """
    run_dir, root = Path(run_dir), checkpoint_dir(run_dir)
    named = _pointer(run_dir, "latest")
    if named is None:
        return None
    dirs = _step_dirs(run_dir)
    if _is_step_dir(named):  # `latest` set back by hand (docs/slurm.md): later ones are not to be touched
        dirs = [p for p in dirs if _step(p) <= _step(named)]
    chosen, damaged = _newest_intact(dirs)
    if chosen is None:
        if damaged:
            raise _no_intact(run_dir, damaged)
        raise UserError(
            f"{root / 'latest'} names {named.name}, which is missing, and there is no other checkpoint; "
            "restore it, or remove the pointer to start from scratch"
        )
    if repair:
        _repair(run_dir, chosen, named, damaged)
    return chosen


def _repair(run_dir: Path, chosen: Path, named: Path, damaged: list[tuple[Path, str]]) -> None:
    root = checkpoint_dir(run_dir)
    if damaged:
        (root / "damaged").mkdir(exist_ok=True)
    for path, problem in damaged:
        dest = _unique(root / "damaged" / path.name)
        path.rename(dest)
        print(
            f"usjepa: checkpoint {path} is damaged ({problem}); moved to {dest.relative_to(root.parent)}, "
            f"resuming from {chosen.name}",
            file=sys.stderr,
        )
    if not _is_step_dir(named) and named not in [p for p, _ in damaged]:
        print(
            f"usjepa: {root / 'latest'} names {named.name}, which is missing; resuming from {chosen.name}",
            file=sys.stderr,
        )
    if named != chosen:
        atomic_write_text(root / "latest", chosen.name)
    best = _pointer(run_dir, "best")
    if best is not None and best in [p for p, _ in damaged]:
        # Only checkpoints up to the one resumed from: training overwrites those after it.
        replacement = _best_intact([p for p in list_checkpoints(run_dir) if _step(p) <= _step(chosen)])
        if replacement is None:
            (root / "best").unlink()
        else:
            atomic_write_text(root / "best", replacement.name)


def find_checkpoint(run_dir: Path, name: str) -> Path:
    """The intact checkpoint of run `run_dir` that `name` (best, latest or step_N) names. `best`
    falls back to the latest, with a note, where no checkpoint was validated. A damaged `best`
    or `latest` falls back to the best or newest intact one, with a note naming it (nothing is
    moved: that is the next training start's job); a damaged step_N is an error."""
    run_dir = Path(run_dir)
    dirs = _step_dirs(run_dir)
    if not dirs:
        raise UserError(
            f"{run_dir}: no checkpoint yet; train it first (usjepa train CONFIG run.dir={run_dir}) "
            "or wait for its first checkpoint (every checkpoint.every_steps steps)"
        )
    if name == "best":
        return _find_best(run_dir, dirs)
    if name == "latest":
        return _find_latest(run_dir, dirs)
    match = _STEP_NAME.match(name)
    for path in dirs:
        if match and _step(path) == int(match.group(1)):
            if problem := checkpoint_problem(path):
                raise UserError(
                    f"{run_dir}: checkpoint {path.name} is damaged ({problem}); choose latest, best or another step"
                )
            return path
    raise UserError(
        f"{run_dir}: no checkpoint '{name}'; choose latest, best or one of "
        f"{', '.join(p.name for p in list_checkpoints(run_dir)) or 'none (all are incomplete)'}"
    )


def _note_damaged(damaged: list[tuple[Path, str]], using: Path, which: str) -> None:
    for path, problem in damaged:
        print(
            f"usjepa: checkpoint {path} is damaged ({problem}); using {using.name}, the {which} intact one",
            file=sys.stderr,
        )


def _find_latest(run_dir: Path, dirs: list[Path], known_damaged: Sequence[tuple[Path, str]] = ()) -> Path:
    named = _pointer(run_dir, "latest")
    if named is not None and _is_step_dir(named):
        dirs = [p for p in dirs if _step(p) <= _step(named)]
    chosen, damaged = _newest_intact(dirs)
    if chosen is None:
        raise _no_intact(run_dir, [*known_damaged, *damaged])
    if named is not None and not _is_step_dir(named):
        print(
            f"usjepa: {checkpoint_dir(run_dir) / 'latest'} names {named.name}, which is missing; using {chosen.name}",
            file=sys.stderr,
        )
    _note_damaged(damaged, chosen, "newest")
    return chosen


def _find_best(run_dir: Path, dirs: list[Path]) -> Path:
    named = _pointer(run_dir, "best")
    if named is not None and _is_step_dir(named):
        if (problem := checkpoint_problem(named)) is None:
            return named
        others = [p for p in dirs if p != named]
        if (best := _best_intact(others)) is not None:
            _note_damaged([(named, problem)], best, "best")
            return best
        latest = _find_latest(run_dir, others, [(named, problem)])
        _note_damaged([(named, problem)], latest, "newest")
        return latest
    latest = _find_latest(run_dir, dirs)
    print(
        f"usjepa: {run_dir}: no checkpoint was validated (no val split, or train.validate=false); "
        f"using the latest, {latest.name}",
        file=sys.stderr,
    )
    return latest


def read_meta(path: Path) -> dict:
    """meta.json of checkpoint `path`; a UserError naming the checkpoint where it is unusable."""
    meta, problem = _load_meta(path)
    if problem:
        raise UserError(f"checkpoint {path}: {problem}")
    return meta


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every call without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_module_weights(path: Path, module: torch.nn.Module, prefix: str, key: str = "model") -> None:
    """Load the parameters checkpoint `path` saved under `<key>.<prefix>` into `module`: the
    student's encoder (`model.encoder.`), or the EMA target (`target.`, prefix ""). One process
    reads a checkpoint that any number of ranks wrote."""
    wanted = {f"{prefix}{k}": v for k, v in module.state_dict().items()}
    with single_process_quiet():
        dcp.load({key: wanted}, checkpoint_id=path, no_dist=True)
    module.load_state_dict({k[len(prefix) :]: v for k, v in wanted.items()})
