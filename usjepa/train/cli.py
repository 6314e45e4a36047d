"""`usjepa train CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse

from usjepa.config import load_config
from usjepa.train.loop import train


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if result.stop_signal is not None:
        return args.exit_code_on_stop
    if result.rank == 0:
        print(f"{cfg.train.objective}: step {result.step}/{cfg.train.total_steps}, loss {result.loss:.4f}, "
              f"{result.images_per_s:.0f} images/s, {result.seconds:.0f} s; run dir {result.run_dir} "
              f"(tensorboard --logdir {result.run_dir / 'tb'})")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", description="Train with the settings of CONFIG (YAML) and KEY=VALUE overrides "
                    "(e.g. train.total_steps=100 run.dir=runs/x optim.lr=1e-4). Unknown keys fail "
                    "before any work. Rerunning with the same run.dir resumes from its latest checkpoint. "
                    "SIGTERM/SIGUSR2/Ctrl-C finish the step, save and exit. "
                    "Works under `torchrun -m usjepa train`.")
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("--exit-code-on-stop", type=int, default=0, metavar="N",
                   help="exit status after a signal stopped the run and it was saved (default 0); a batch "
                        "script can requeue itself on it (launch/multinode.sbatch uses 75)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of config settings")
    p.set_defaults(func=_run)
