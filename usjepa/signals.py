"""The signals that ask a run to finish its step, save and stop: Slurm's time-limit and
preemption warning (SIGUSR2), termination, Ctrl-C. In order of precedence: when the ranks of a
run got different ones, the first wins, since USR2 is the one a launcher requeues on."""

import signal

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR2", None), signal.SIGTERM, signal.SIGINT) if s)
