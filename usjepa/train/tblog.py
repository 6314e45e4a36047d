"""TensorBoard events of a run: written where a failure can be reported, each step once.

`EventWriter` writes each event to the event file as it is added, in the training process's
own thread (torch's SummaryWriter writes from a background thread, whose failure, e.g. a full
disk or the file-size limit, printed a traceback there and surfaced as a second one in the
loop). A write that fails ends the run with one line naming the file, after cutting the file
back to its last whole event; the checkpoints are untouched.

A run killed after its last checkpoint has logged steps that the resumed run logs again. The
writer's purge marker (`purge_step`) makes TensorBoard itself drop the old ones, but event
files read by other tools (tbparse, pandas exports, our tests) would still hold both; so on a
resume the older files are rewritten without the steps after the checkpoint.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event, SessionLog, SourceMetadata
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard.summary import image, scalar, text

from usjepa.errors import UserError
from usjepa.fileio import atomic_write
from usjepa.rundir import cannot_write

_uid = itertools.count()


def _cannot_write(what: Path, e: OSError, resume_point: str) -> UserError:
    return cannot_write(f"TensorBoard events to {what}", e.strerror or str(e), resume_point)


class EventWriter:
    """The run's TensorBoard event file, in `log_dir` (created), with add_scalar, add_text and
    add_image as torch's SummaryWriter has them. Each event is in the file when the call returns;
    a failed write raises a UserError naming the file (`resume_point()` names the checkpoint
    the run resumes from) and leaves the file holding whole events only."""

    def __init__(self, log_dir: Path, purge_step: int | None = None, resume_point: Callable[[], str] = lambda: ""):
        self.log_dir = Path(log_dir)
        self._resume_point = resume_point
        self._fd: int | None = None
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_uid)}"
        self.path = self.log_dir / name
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise _cannot_write(self.path if self.log_dir.is_dir() else self.log_dir, e, resume_point()) from None
        self._size = 0
        meta = SourceMetadata(writer="usjepa.train.tblog")
        self._add(Event(wall_time=time.time(), file_version="brain.Event:2", source_metadata=meta))
        if purge_step is not None:  # TensorBoard drops the events of this step and later ones before it
            self._add(Event(wall_time=time.time(), step=purge_step, file_version="brain.Event:2"))
            self._add(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def add_scalar(self, tag: str, value, step: int) -> None:
        self._add(Event(wall_time=time.time(), step=int(step), summary=scalar(tag, value)))

    def add_text(self, tag: str, text_string: str, step: int) -> None:
        self._add(Event(wall_time=time.time(), step=int(step), summary=text(tag, text_string)))

    def add_image(self, tag: str, img, step: int, dataformats: str = "CHW") -> None:
        self._add(Event(wall_time=time.time(), step=int(step), summary=image(tag, img, dataformats=dataformats)))

    def _add(self, event: Event) -> None:
        if self._fd is None:
            return  # closed, or failed (its error was raised)
        record = io.BytesIO()  # one record's bytes, written to the file in one piece
        RecordWriter(record).write(event.SerializeToString())
        data = record.getvalue()
        try:
            view = memoryview(data)
            while view:  # a regular file may take part of a write: write the rest
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            self._fail(e)
        self._size += len(data)

    def _fail(self, e: OSError) -> None:
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, self._size)  # no half event at the end: readers stop at one
        except OSError:
            pass
        os.close(fd)
        raise _cannot_write(self.path, e, self._resume_point()) from None

    def flush(self) -> None:
        """Nothing to do: every event is written when it is added (for SummaryWriter's callers)."""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_records(f, records: list[bytes]) -> None:
    writer = RecordWriter(f)
    for record in records:
        writer.write(record)


def drop_steps_after(tb_dir: Path, step: int, resume_point: str = "") -> int:
    """Rewrite the event files in `tb_dir` without the events of steps after `step` (each file
    replaced atomically); returns how many events were dropped. A file that cannot be written
    is a UserError (`resume_point`: the checkpoint a rerun resumes from), the old one kept."""
    dropped = 0
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in records if Event.FromString(r).step <= step]
        if len(kept) == len(records):
            continue
        try:
            atomic_write(path, lambda f, kept=kept: _write_records(f, kept))
        except OSError as e:
            raise _cannot_write(path, e, resume_point or "its latest checkpoint") from None
        dropped += len(records) - len(kept)
    return dropped
