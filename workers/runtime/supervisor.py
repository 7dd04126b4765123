"""The supervised training child: started warm, fed its payload, killed on abort.

``train_rank`` runs in a Celery prefork child, which is daemonic and cannot use
``multiprocessing``; the framework runs in a plain subprocess instead, so a
segfault or a CUDA fault cannot take the worker down and a hung collective can
be killed. ``PR_SET_PDEATHSIG`` ties the child's life to its supervisor.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from workers.runtime.events import parse

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


OUTPUT_LINES_PER_SECOND = 50     # relayed to the job log; a chatty loop is cut, not the training
OUTPUT_LINE_CHARS = 2000


class TrainingChild:
    """One ``python -m workers.runtime.child`` process, the thread reading its events, and the thread
    reading its output (train_func's prints, logging and stderr: relayed as ``output`` events, rate-limited,
    and the tail kept for the rank's error)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.runtime.child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, text=True, errors="replace", bufsize=1, preexec_fn=_die_with_parent,
            start_new_session=True)   # its own process group: whatever train_func forks goes with it
        self.events: queue.Queue[dict | None] = queue.Queue()
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.output_dropped = 0
        self._reader = threading.Thread(target=self._read, name="gangway-child-reader", daemon=True)
        self._reader.start()
        self._output = threading.Thread(target=self._read_output, name="gangway-child-output", daemon=True)
        self._output.start()

    def _read_output(self) -> None:
        assert self.proc.stderr is not None
        window, sent = time.monotonic(), 0
        for raw in self.proc.stderr:
            line = raw.rstrip("\n")[:OUTPUT_LINE_CHARS]
            self.tail.append(line)
            now = time.monotonic()
            if now - window >= 1.0:
                window, sent = now, 0
            if sent < OUTPUT_LINES_PER_SECOND:
                sent += 1
                self.events.put({"ev": "output", "line": line})
            else:
                self.output_dropped += 1

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = parse(line)
            if msg is not None:
                self.events.put(msg)
        self.events.put(None)   # EOF: the child is gone or closed its protocol stream

    def wait_reader(self, timeout: float) -> None:
        self._reader.join(timeout)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, line: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass   # the child died; its exit code tells the story

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self, grace: float) -> None:
        """Stop the child and everything it started (its process group)."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._signal_group(signal.SIGKILL)   # grandchildren left behind by the training code

    def stderr_tail(self, limit: int = 4000) -> str:
        """The last lines the training process printed (stdout and stderr), at most ``limit`` characters."""
        self._output.join(timeout=1.0)   # the pipe drains once the process is gone
        return "\n".join(self.tail)[-limit:]

    def close(self) -> None:
        self.kill(1.0)


class Standby:
    """Keeps one warm child ready, so a rank starts training without paying for imports."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self._child: TrainingChild | None = None
        self._lock = threading.Lock()

    def take(self) -> TrainingChild:
        with self._lock:
            child, self._child = self._child, None
        if child is not None and child.alive:
            return child
        return TrainingChild(self.env)

    def refill(self) -> None:
        with self._lock:
            if self._child is None or not self._child.alive:
                self._child = TrainingChild(self.env)

    def close(self) -> None:
        with self._lock:
            if self._child is not None:
                self._child.close()
                self._child = None
