"""Throughput, where a step's time goes, and peak memory: the figures behind `perf/*`."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator

import torch

PHASES = ("data", "teacher", "student", "optimizer")  # student = encoder + predictor forward and backward


class Meter:
    """Images/s and seconds per step since the last read, and the split of a step into
    PHASES. On CUDA the phases are timed only on steps marked `timed` (each phase end then
    waits for the GPU, which would slow every step); on the CPU every step is timed."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.timed = True
        self._reset()

    def _reset(self) -> None:
        self.window_start = time.perf_counter()
        self.images = self.steps = self.timed_steps = 0
        self.flops = self.tokens = 0.0
        self.phases = dict.fromkeys(PHASES, 0.0)

    def begin_step(self, timed: bool) -> None:
        self.timed = timed or not self.cuda
        self.timed_steps += self.timed

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self.timed:
            if self.cuda:
                torch.cuda.synchronize()
            self.phases[name] += time.perf_counter() - t0

    def count(self, images: int, flops: float, tokens: float = 0.0) -> None:
        """One step of `images` images (global batch), `flops` model FLOPs and `tokens` trained
        tokens (context + target patches), over all ranks."""
        self.images += images
        self.flops += flops
        self.tokens += tokens
        self.steps += 1

    def read_and_reset(self) -> dict[str, float]:
        """perf/* figures over the window: images/s, trained tokens/s, achieved TFLOP/s (model
        FLOPs, all ranks), step time, and seconds per step of each phase."""
        elapsed = time.perf_counter() - self.window_start
        timed = max(self.timed_steps, 1)
        figures = {
            "images_per_s": self.images / elapsed,
            "tokens_per_s": self.tokens / elapsed,
            "tflop_per_s": self.flops / elapsed / 1e12,
            "step_time_s": elapsed / max(self.steps, 1),
            **{f"{name}_s": seconds / timed for name, seconds in self.phases.items()},
        }
        self._reset()
        return figures

    def total_seconds(self) -> float:
        return time.perf_counter() - self.start


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: allocated GPU memory on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def module_gib(module: torch.nn.Module) -> float:
    """Memory this rank holds for a module's parameters and buffers (its shards, under FSDP)."""
    tensors = [getattr(t, "to_local", lambda t=t: t)() for t in (*module.parameters(), *module.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30
