"""Phase 1 over all items: results (reused where OUT/.work has them) fed to a Selection in the
seeded item order, whatever the number of worker processes and their timing."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from usjepa.errors import UserError
from usjepa.ingest.build.item import run_batch
from usjepa.ingest.build.select import Selection
from usjepa.ingest.build.workdir import WorkDir, read_result
from usjepa.ingest.settings import BuildSettings


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group: the parent handles it, workers finish their
    # item and leave when the pool shuts down. If the parent dies (kill -9), exit too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:

        def watch() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _pool_context():
    # fork where there is one (Linux; what torch's DataLoader uses): workers start at once and
    # never re-import the caller's __main__ (spawn and forkserver do, which breaks scripts
    # without a main guard). Workers only run numpy/PIL/scipy code, nothing that needs a
    # lock a parent thread could hold. The build's lock is a POSIX record lock (lockf),
    # which forked children do not inherit. Elsewhere: spawn.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def resolve_workers(workers: int) -> int:
    """0 or less: one per available CPU core."""
    if workers and workers > 0:
        return int(workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _InProcess:
    """The executor of workers=1: runs each batch at once, in this process."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, **_) -> None:
        pass


class _Phase1:
    """Schedules items a bounded window ahead of the frontier and consumes results in order."""

    def __init__(self, items, order, work: WorkDir, settings: BuildSettings, workers: int, bar):
        self.items, self.order, self.work, self.bar = items, order, work, bar
        self.selection = Selection(settings, items)
        self.item_settings = settings.item_settings()
        self.chunk = 1 if workers <= 1 or settings.max_samples else 4
        self.window = 2 * workers
        self.records: dict[int, tuple[dict, int, str]] = {}
        self.pending: dict = {}
        self.next_pos = self.frontier = self.reused = self.processed = 0
        self.in_process = workers <= 1
        self.executor = _InProcess()
        if not self.in_process:
            self.executor = ProcessPoolExecutor(
                max_workers=workers, mp_context=_pool_context(), initializer=_worker_init
            )

    def run(self) -> None:
        n, selection = len(self.order), self.selection
        while True:
            # Not past the cap: results that workers finished ahead of it depend on timing,
            # and feeding them would make the summary's counts (read, capped, failed) differ.
            while self.frontier in self.records and not selection.full:
                header, base, path = self.records.pop(self.frontier)
                selection.feed(self.order[self.frontier], header, base, path)
                self.frontier += 1
            self.bar.set_postfix(
                frames=selection.frames, skipped=len(selection.failed), dups=len(selection.duplicates), refresh=False
            )
            if selection.full or self.frontier >= n:
                return
            self._schedule()
            if self.pending:
                self._collect()

    def _schedule(self) -> None:
        batch: list[tuple[int, str]] = []
        looked, n = 0, len(self.order)
        while self.next_pos < n and len(self.pending) < self.window and not self.selection.full and looked < 512:
            looked += 1
            pos, self.next_pos = self.next_pos, self.next_pos + 1
            path = self.work.path_of(self.items[self.order[pos]])
            cached = read_result(path)
            if cached is not None:
                self.records[pos] = (*cached, str(path))
                self.reused += 1
                self.bar.update()
                continue
            batch.append((pos, str(path)))
            if len(batch) == self.chunk:
                self._submit(batch)
                batch = []
                if self.in_process:
                    break  # advance the frontier after each item (a cap may be reached)
        if batch:
            self._submit(batch)

    def _submit(self, batch: list[tuple[int, str]]) -> None:
        tasks = [(self.items[self.order[pos]], path) for pos, path in batch]
        self.pending[self.executor.submit(run_batch, tasks, self.item_settings)] = batch

    def _collect(self) -> None:
        done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
        for future in done:
            positions = self.pending.pop(future)
            for (pos, path), (header, base) in zip(positions, future.result()):
                self.records[pos] = (header, base, path)
            self.processed += len(positions)
            self.bar.update(len(positions))


def process_items(
    items, order, work: WorkDir, settings: BuildSettings, workers: int, progress: bool
) -> tuple[Selection, dict]:
    """Phase 1: results for the items in `order` fed in that order to a Selection; stops early
    once a sample cap is reached."""
    found = work.count_results()
    if found and progress:
        tqdm.write(f"resuming: {found} finished item(s) in {work.dir} are reused")
    n = len(order)
    bar = tqdm(total=n, unit="item", desc="process", disable=not progress, dynamic_ncols=True, smoothing=0.05)
    phase = None
    clean = False
    try:
        phase = _Phase1(items, order, work, settings, workers, bar)
        phase.run()
        clean = True
    except BrokenProcessPool:
        raise UserError(
            f"a worker process died (out of memory? killed?) after {phase.processed + phase.reused} of {n} items; "
            f"rerun the same command to resume (finished work in {work.dir} is kept), perhaps with fewer --workers"
        ) from None
    finally:
        bar.close()
        if phase is not None:
            phase.executor.shutdown(wait=clean, cancel_futures=True)
    return phase.selection, {
        "items_reused": phase.reused,
        "items_processed": phase.processed,
        "items_not_read": n - phase.frontier,
    }
