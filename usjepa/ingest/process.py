"""Phase 1 of a build over all items: results (reused where `OUT/.work` has them) fed to a
Selection in the seeded item order.

Items run in `workers` processes (1: in this process), a bounded window ahead of the
frontier; results are consumed in the seeded order, so nothing downstream depends on the
number of workers or on timing. With a sample cap, work stops once the Selection is full.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from tqdm import tqdm

from usjepa.errors import UserError
from usjepa.ingest.selection import Selection
from usjepa.ingest.work import read_result, run_batch
from usjepa.ingest.workdir import WorkDir

if TYPE_CHECKING:  # writer.py imports this module
    from usjepa.ingest.writer import BuildSettings


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


def process_items(items, order, work: WorkDir, settings: BuildSettings, workers: int,
                  progress: bool) -> tuple[Selection, dict]:
    """Phase 1: results for the items in `order` (reused where they exist), fed in that
    order to a Selection; stops early once a sample cap is reached."""
    selection = Selection(settings, items)
    item_settings = settings.item_settings()
    n = len(order)
    found = work.count_results()
    if found and progress:
        tqdm.write(f"resuming: {found} finished item(s) in {work.dir} are reused")
    chunk = 1 if workers <= 1 or settings.max_samples else 4
    window = 2 * workers
    records: dict[int, tuple[dict, int, str]] = {}
    pending: dict = {}
    next_pos = frontier = reused = processed = 0
    executor = None
    if workers > 1:
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_worker_init)
    bar = tqdm(total=n, unit="item", desc="process", disable=not progress, dynamic_ncols=True, smoothing=0.05)
    clean = False
    try:
        while True:
            while frontier in records:
                header, base, path = records.pop(frontier)
                selection.feed(order[frontier], header, base, path)
                frontier += 1
            bar.set_postfix(frames=selection.frames, skipped=len(selection.failed),
                            dups=len(selection.duplicates), refresh=False)
            if selection.full or frontier >= n:
                break
            batch: list[tuple[int, str]] = []
            looked = 0
            while next_pos < n and len(pending) < window and not selection.full and looked < 512:
                looked += 1
                pos, next_pos = next_pos, next_pos + 1
                path = work.path_of(items[order[pos]])
                cached = read_result(path)
                if cached is not None:
                    records[pos] = (*cached, str(path))
                    reused += 1
                    bar.update()
                    continue
                batch.append((pos, str(path)))
                if len(batch) == chunk:
                    pending[_submit(executor, items, order, batch, item_settings, records)] = batch
                    batch = []
                    if executor is None:
                        break  # advance the frontier after each item (a cap may be reached)
            if batch:
                pending[_submit(executor, items, order, batch, item_settings, records)] = batch
            if executor is None:
                processed += sum(len(b) for b in pending.values())
                bar.update(sum(len(b) for b in pending.values()))
                pending.clear()
                continue
            if pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    positions = pending.pop(future)
                    for (pos, path), (header, base) in zip(positions, future.result()):
                        records[pos] = (header, base, path)
                    processed += len(positions)
                    bar.update(len(positions))
        clean = True
    except BrokenProcessPool:
        raise UserError(
            f"a worker process died (out of memory? killed?) after {processed + reused} of {n} items; "
            f"rerun the same command to resume (finished work in {work.dir} is kept), perhaps with fewer --workers"
        ) from None
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=clean, cancel_futures=True)
    return selection, {"items_reused": reused, "items_processed": processed, "items_not_read": n - frontier}


def _submit(executor, items, order, batch: list[tuple[int, str]], item_settings, records):
    tasks = [(items[order[pos]], path) for pos, path in batch]
    if executor is None:  # in this process (workers=1): run now
        for (pos, path), (header, base) in zip(batch, run_batch(tasks, item_settings)):
            records[pos] = (header, base, path)
        return object()
    return executor.submit(run_batch, tasks, item_settings)
