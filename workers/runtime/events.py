"""The line protocol between a rank's supervisor and its training child.

Child -> supervisor, one JSON object per line on the child's stdout:
``alive``, ``fetched``, ``progress``, ``eval``, ``done``, ``error``.  Supervisor -> child on
stdin: the payload line, then ``go`` (or ``abort``).  The child emits through a
bounded queue drained by a thread, so a slow reader never blocks a training round.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import traceback
from collections.abc import Callable
from typing import IO, Any

GO = "go"
ABORT = "abort"


class Emitter:
    """Non-blocking event sink for the training child."""

    def __init__(self, stream: IO[str], maxsize: int = 4096) -> None:
        self._stream = stream
        self._q: queue.Queue[str | None] = queue.Queue(maxsize=maxsize)
        self.dropped = 0
        self._thread = threading.Thread(target=self._drain, name="gangway-emitter", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (line := self._q.get()) is not None:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            finally:   # a flush() never waits on an event that could not be written
                self._q.task_done()
        self._q.task_done()   # the closing sentinel: a flush after close() returns

    def flush(self) -> None:
        """Block until every event emitted so far is in the pipe (the supervisor reads what a process
        killed right after wrote, so an event that must not be lost survives its sender)."""
        self._q.join()

    def emit(self, ev: str, *, droppable: bool = False, **fields: Any) -> None:
        line = json.dumps({"ev": ev, **fields}, default=str)
        if droppable:
            try:
                self._q.put_nowait(line)
            except queue.Full:
                self.dropped += 1   # progress is coalesced anyway; never stall a round for it
        else:
            self._q.put(line)

    @contextlib.contextmanager
    def alive(self, phase: str, every: float = 1.0):
        """Say ``alive`` every ``every`` s while a phase bounded by its own deadlines runs (a shard fetch,
        whose store retries with backoff), so the supervisor's progress timeout does not call it hung."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                self.emit("alive", droppable=True, phase=phase)
        t = threading.Thread(target=beat, name="gangway-alive", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=every + 1)

    def error(self, exc: BaseException) -> None:
        self.emit("error", type=type(exc).__name__, message=str(exc),
                  traceback="".join(traceback.format_exception(exc)))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)


def parse(line: str) -> dict[str, Any] | None:
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) and "ev" in msg else None


def protocol_stream() -> IO[str]:
    """Take the real stdout for the protocol; library prints then go to stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(fd, "w", buffering=1)


def matrix_progress(emitter: Emitter) -> Callable[[str, int, int], None]:
    """Each chunk a matrix (or a LightGBM Dataset) takes in, as an event: the supervisor's progress timeout
    judges silence, and a shard of gigabytes is minutes of binning, which a hung collective is not."""
    return lambda name, i, n: emitter.emit("matrix", droppable=True, dataset=name, chunk=i, chunks=n)
