"""The signals that ask a run to finish its step, save and stop: Slurm's time-limit and
preemption warning (SIGUSR2), termination, Ctrl-C, and the hang-up of a closed terminal or ssh
session (SIGHUP; a run started under `nohup` keeps ignoring it). In order of precedence: when
the ranks of a run got different ones, the first wins, since USR2 is the one a launcher
requeues on."""

import signal

STOP_SIGNALS = tuple(
    s
    for s in (
        getattr(signal, "SIGUSR2", None),
        signal.SIGTERM,
        signal.SIGINT,
        getattr(signal, "SIGHUP", None),
    )
    if s
)

# Stop signals that stay ignored where the process was started ignoring them: `nohup` ignores
# SIGHUP precisely so that the run outlives its terminal.
KEPT_IF_IGNORED = tuple(s for s in (getattr(signal, "SIGHUP", None),) if s)
