#!/usr/bin/env python3
r"""Submit `usjepa train` to Slurm with submitit: one task per GPU, requeued on time limits and
preemption, resumed from the run dir's latest checkpoint.

    python launch/submit.py configs/salt_vitb16.yaml data.shards=shards/corpus \
        teacher.checkpoint=runs/teacher_mae_vitb16 --nodes 2 --tasks-per-node 4 \
        --gpus-per-node 4 --cpus-per-task 9 --mem 240G --partition gpu --time 2880

The config (and its data, teacher and stream layout for the requested world size) is checked
before anything is submitted; `--dry-run` prints the job parameters and the resolved config
and submits nothing. It prints the Slurm job id and the run dir. Job logs go to
RUN/slurm/<job id>_<task>_log.{out,err}; RUN/launch/ records the submission and every start.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from usjepa.config import Config, dump_yaml, load_config, to_dict  # noqa: E402
from usjepa.data.streams import ShardSet, StreamPlan  # noqa: E402
from usjepa.errors import UserError, int_at_least  # noqa: E402

_SLURM_TIME = re.compile(
    r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$"
)


def slurm_minutes(text: str) -> int:
    """A time limit as `sbatch --time` writes it (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM,
    D-HH:MM:SS) in whole minutes, rounded up as Slurm rounds it."""
    m = _SLURM_TIME.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a Slurm time limit; write minutes (90), MM:SS, "
            "HH:MM:SS (01:30:00), D-HH, D-HH:MM or D-HH:MM:SS (2-00:00:00)"
        )
    g = {k: int(v) if v else 0 for k, v in m.groupdict().items()}
    if m["days"] is not None:
        seconds = ((g["days"] * 24 + g["dh"]) * 60 + g["dm"]) * 60 + g["ds"]
    elif m["c"] is not None:  # HH:MM:SS
        seconds = (g["a"] * 60 + g["b"]) * 60 + g["c"]
    else:  # minutes, or MM:SS
        seconds = g["a"] * 60 + g["b"]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"time limit '{text}' must be longer than zero")
    return -(-seconds // 60)


positive_int = int_at_least(1)
count = int_at_least(0)

_SLURM_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)


def slurm_mem(text: str) -> str:
    """Memory per node as `sbatch --mem` takes it: a whole number with an optional K, M, G or T
    suffix (any case; megabytes without one; 0 asks for all of a node's memory)."""
    value = text.strip()
    if not _SLURM_MEM.match(value):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a Slurm memory size; write a whole number with an optional K, M, G or T "
            "suffix (240G, 512000; megabytes without a suffix)"
        )
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config, e.g. configs/salt_vitb16.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of config settings")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--tasks-per-node", type=positive_int, default=1, help="one per GPU")
    p.add_argument("--gpus-per-node", type=count, default=0, help="GPUs to request per node (0: none, CPU run)")
    p.add_argument("--cpus-per-task", type=positive_int, default=None, help="loader workers + 1 is a good start")
    p.add_argument(
        "--mem", type=slurm_mem, default=None, help="memory per node, e.g. 480G (megabytes without a suffix)"
    )
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument(
        "--time",
        type=slurm_minutes,
        default=60,
        metavar="LIMIT",
        help="time limit per job as sbatch takes it: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
        "D-HH:MM:SS (default 60 minutes; requeues continue the run)",
    )
    p.add_argument("--job-name", default=None, help="default: the run dir's name")
    p.add_argument(
        "--signal-delay",
        type=positive_int,
        default=90,
        help="seconds before the time limit at which SIGUSR2 asks the job to save and requeue (shorter than --time)",
    )
    p.add_argument(
        "--max-requeues",
        type=count,
        default=10,
        help="requeues after hitting the time limit (preemptions always requeue)",
    )
    p.add_argument(
        "--no-data-check",
        action="store_true",
        help="skip checking data.shards here (for paths only the compute nodes see)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the job parameters and resolved config; submit nothing"
    )
    p.add_argument("--wait", action="store_true", help="wait for the job (requeues included) and report how it ended")
    args = p.parse_intermixed_args(argv)  # KEY=VALUE overrides before or after the options
    if args.signal_delay >= args.time * 60:
        p.error(
            f"argument --signal-delay: {args.signal_delay} s is not shorter than the time limit --time "
            f"({args.time} min = {args.time * 60} s): the job would be asked to stop before it started"
        )
    return args


def make_paths_absolute(cfg: Config) -> None:
    """The run dir and local data paths, absolute: jobs may start in another directory."""
    cfg.run.dir = str(Path(cfg.run.dir).resolve())
    if cfg.data.shards:
        cfg.data.shards = str(Path(cfg.data.shards).resolve())
    for entry in cfg.data.mixture:
        entry.shards = str(Path(entry.shards).resolve())
    if cfg.teacher.checkpoint.lower() != "none" and Path(cfg.teacher.checkpoint).exists():
        cfg.teacher.checkpoint = str(Path(cfg.teacher.checkpoint).resolve())


def check(cfg: Config, world_size: int, data: bool) -> None:
    """What would fail at the job's start, found now: the streams' split over the ranks and
    loader workers, the shards (their counts against the streams) and the teacher path."""
    StreamPlan.of(cfg, 0, world_size)
    if not data:
        return
    ShardSet.load(cfg)
    teacher = cfg.teacher.checkpoint
    if cfg.train.objective == "salt" and teacher.lower() != "none" and not Path(teacher).exists():
        raise UserError(
            f"teacher.checkpoint={teacher}: not found; give a stage-1 run dir or a state-dict file "
            "(or pass --no-data-check if only the compute nodes see it)"
        )


def slurm_parameters(args: argparse.Namespace, cfg: Config) -> dict:
    params = {
        "nodes": args.nodes,
        "ntasks_per_node": args.tasks_per_node,
        "time": args.time,
        "job_name": args.job_name or Path(cfg.run.dir).name,
        "signal_delay_s": args.signal_delay,
        "cpus_per_task": args.cpus_per_task,
        "mem": args.mem,
        "partition": args.partition,
        "account": args.account,
        "qos": args.qos,
        "gpus_per_node": args.gpus_per_node or None,
    }
    # One rank that dies (out of memory, a crash) must end the step, not leave the others
    # waiting in a collective until the timeout.
    params["srun_args"] = ["--kill-on-bad-exit=1"]
    return {k: v for k, v in params.items() if v is not None}


_EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception)): (.+)$")


def job_outcome(job) -> tuple[object, str]:
    """(task 0's result, "") or (None, the error of a failed task: the message of the last
    exception in its traceback, which for a user mistake is usjepa's one-line error)."""
    try:
        return job.results()[0], ""
    except Exception as e:  # submitit's FailedJobError / UncompletedJobError carry the job's traceback
        found = [m for line in str(e).splitlines() if (m := _EXCEPTION_LINE.match(line.strip()))]
        return None, found[-1].group(2) if found else str(e).strip().splitlines()[0]


def wait(job, run_dir: Path) -> int:
    while not job.done():
        time.sleep(2)
    result, error = job_outcome(job)
    if error:
        print(f"job {job.job_id} failed: {error} (log: {run_dir}/slurm/{job.job_id}_0_log.err)", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished: {result}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        make_paths_absolute(cfg)
        check(cfg, args.nodes * args.tasks_per_node, data=not args.no_data_check)
    except UserError as e:
        print(f"launch/submit.py: error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.run.dir)
    params = slurm_parameters(args, cfg)
    if args.dry_run:
        print("job parameters (sbatch):")
        for key, value in params.items():
            print(f"  {key}: {value}")
        print(f"  max_num_timeout: {args.max_requeues}\nresolved config ({run_dir}):")
        print(dump_yaml(cfg))
        return 0

    import submitit

    from usjepa.train.provenance import record_submission
    from usjepa.train.slurm import TrainJob

    executor = submitit.SlurmExecutor(folder=run_dir / "slurm", max_num_timeout=args.max_requeues)
    executor.update_parameters(**params)
    job = executor.submit(TrainJob(to_dict(cfg)))
    record_submission(run_dir, str(job.job_id), {**params, "max_num_timeout": args.max_requeues})
    print(f"submitted job {job.job_id}; run dir {run_dir}")
    print(f"  watch: tensorboard --logdir {run_dir / 'tb'}; logs: {run_dir / 'slurm'}")
    return wait(job, run_dir) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
