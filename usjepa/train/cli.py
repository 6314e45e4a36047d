"""`usjepa train CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from usjepa.config import load_config
from usjepa.errors import int_at_least
from usjepa.train.loop import train
from usjepa.train.slurm import requeue_this_job

# A signal stopped the run before train.total_steps, after it saved: rerun to continue.
EXIT_STOPPED = 3


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if result.stop_signal is not None:
        if args.requeue_on_stop and result.rank == 0:
            print(f"usjepa: {requeue_this_job(args.requeue_on_stop)}", file=sys.stderr)
        # Saved but not finished: `train && export` must not go on with a half-trained model.
        return EXIT_STOPPED
    if result.rank == 0:
        print(
            f"{cfg.train.objective}: step {result.step}/{cfg.train.total_steps}, loss {result.loss:.4f}, "
            f"{result.images_per_s:.0f} images/s, {result.seconds:.0f} s; run dir {result.run_dir} "
            f"(tensorboard --logdir {result.run_dir / 'tb'})"
        )
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        description="Train with the settings of CONFIG (YAML) and KEY=VALUE overrides "
        "(e.g. train.total_steps=100 run.dir=runs/x optim.lr=1e-4). Unknown keys fail "
        "before any work. Rerunning with the same run.dir resumes from its latest checkpoint. "
        "SIGTERM/SIGUSR2/SIGHUP/Ctrl-C finish the step, save and exit with status 3 (rerun to continue). "
        "Works under `torchrun -m usjepa train`.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument(
        "--requeue-on-stop",
        type=int_at_least(0),
        default=0,
        metavar="MAX",
        help="in a Slurm job: after a signal stopped the run and every rank saved, rank 0 requeues "
        "the job (scontrol requeue) unless it has been requeued MAX times already "
        "(launch/multinode.sbatch uses it; submitit jobs requeue through submitit)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of config settings")
    p.set_defaults(func=_run)
