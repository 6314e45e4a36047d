"""TensorBoard events of a resumed run: each step once, whatever reads them.

A run killed after its last checkpoint has logged steps that the resumed run logs again. The
writer's purge marker (`purge_step`) makes TensorBoard itself drop the old ones, but event
files read by other tools (tbparse, pandas exports, our tests) would still hold both; so on a
resume the older files are rewritten without the steps after the checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter


def drop_steps_after(tb_dir: Path, step: int) -> int:
    """Rewrite the event files in `tb_dir` without the events of steps after `step` (each file
    replaced atomically); returns how many events were dropped."""
    dropped = 0
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in records if Event.FromString(r).step <= step]
        if len(kept) == len(records):
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for record in kept:
                writer.write(record)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dropped += len(records) - len(kept)
    return dropped
