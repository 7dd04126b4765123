"""The supervised training child: started warm, fed its payload, killed on abort.

``train_rank`` runs in a Celery prefork child, which is daemonic and cannot use
``multiprocessing``; the framework runs in a plain subprocess instead, so a
segfault or a CUDA fault cannot take the worker down and a hung collective can
be killed. ``PR_SET_PDEATHSIG`` ties the child's life to its supervisor. The child is forked by the
worker's zygote (``Zygote``, ``workers/runtime/zygote.py``), or spawned (``Standby``) with
``GANGWAY_ZYGOTE=0`` and whenever the zygote is unavailable; ``TrainingChild`` supervises either alike.
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import json
import logging
import os
import queue
import signal
import socket
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

    def __init__(self, env: dict[str, str], proc: subprocess.Popen | ForkedProcess | None = None) -> None:
        """Spawn the child, or supervise ``proc``, one the zygote forked."""
        self.proc = proc if proc is not None else subprocess.Popen(
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


class ZygoteUnavailable(Exception):
    """The zygote did not fork the child (gone, hung, or refusing); the caller spawns one instead."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused   # alive and answering, but it would not fork (a thread in it): keep it


class ForkedProcess:
    """What ``TrainingChild`` uses of a ``Popen``, for a child the zygote forked: its pid, our ends of its
    pipes, and its exit code. It is the zygote's child, not ours, so the zygote reaps it and reports the
    code; if the zygote dies first, the child died with it (its death signal is SIGKILL)."""

    def __init__(self, link: _ZygoteLink, pid: int, stdin, stdout, stderr) -> None:
        self.pid, self.stdin, self.stdout, self.stderr = pid, stdin, stdout, stderr
        self.returncode: int | None = None
        self._link = link

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._link.exit_code(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._link.exit_code(self.pid, timeout=timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"zygote child {self.pid}", timeout or 0)
        return self.returncode


_MAX_MESSAGE = 1 << 20


class _ZygoteLink:
    """One running ``python -m workers.runtime.zygote`` and the socket to it; a thread reads its replies
    and exit reports."""

    def __init__(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.runtime.zygote", str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent,
                start_new_session=True)
        finally:
            theirs.close()
        self.sock = ours
        self._cond = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._exits: dict[int, int] = {}
        self._closed = False
        self._ids = itertools.count(1)
        self._reader = threading.Thread(target=self._read, name="gangway-zygote", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(_MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            msg = json.loads(data)
            with self._cond:
                if "exit" in msg:
                    self._exits[int(msg["exit"])] = int(msg["code"])
                else:
                    self._replies[int(msg["id"])] = msg
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def fork(self, env: dict[str, str], timeout: float) -> ForkedProcess:
        """A new training child with our ends of its stdin, stdout and stderr pipes, or ZygoteUnavailable."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ident = next(self._ids)
        try:
            socket.send_fds(self.sock, [json.dumps({"id": ident, "env": env, "cwd": os.getcwd()}).encode()],
                            [in_r, out_w, err_w])
        except OSError as exc:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise ZygoteUnavailable(f"could not reach the zygote: {exc}") from exc
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)   # in flight to the zygote: the child gets its own copies
        with self._cond:
            self._cond.wait_for(lambda: ident in self._replies or self._closed, timeout)
            reply = self._replies.pop(ident, None)
        if reply is None or "pid" not in reply:
            for fd in (in_w, out_r, err_r):
                os.close(fd)   # a child forked after all reads EOF on stdin and exits as an unused standby
            if reply is not None and "refused" in reply:
                raise ZygoteUnavailable(f"it refused: {reply['refused']}", refused=True)
            raise ZygoteUnavailable("it exited" if self._closed else f"no answer in {timeout:g}s "
                                    "(GANGWAY_ZYGOTE_TIMEOUT)")
        return ForkedProcess(self, int(reply["pid"]), open(in_w, "w", buffering=1, errors="replace"),
                             open(out_r, errors="replace"), open(err_r, errors="replace"))

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """The child's exit code once the zygote reaped it (-SIGKILL if the zygote died first), else None."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self._closed, timeout)
            if pid in self._exits:
                return self._exits.pop(pid)
            return -signal.SIGKILL if self._closed else None

    def close(self) -> None:
        """Kill the zygote (children it forked die with it) and stop the reader."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(timeout=2.0)
        self.sock.close()


class Zygote:
    """Same interface as ``Standby``: ``take()`` returns a child forked in milliseconds by the worker's one
    zygote, which imported the frameworks once. ``refill()`` (re)starts the zygote if it is not running, so
    an idle worker holds one zygote and nothing else. When the zygote is dead, hung or refuses, ``take()``
    spawns the child as ``Standby`` would (and says so); the next ``refill()`` starts a new zygote."""

    def __init__(self, env: dict[str, str], fork_timeout: float = 60.0) -> None:
        self.env = env
        self.fork_timeout = fork_timeout   # covers the zygote's own imports when a job comes at worker start
        self._link: _ZygoteLink | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        link = self._link
        return link.proc.pid if link is not None and link.alive else None

    def take(self) -> TrainingChild:
        with self._lock:
            link = self._link
        if link is None or not link.alive:
            log.warning("zygote %s; spawning the training child", "not started" if link is None
                        else f"(pid {link.proc.pid}) is gone (exit code {link.proc.poll()})")
            return TrainingChild(self.env)
        try:
            return TrainingChild(self.env, link.fork(self.env, self.fork_timeout))
        except ZygoteUnavailable as exc:
            log.warning("zygote (pid %s) did not fork the training child (%s); spawning it", link.proc.pid, exc)
            if not exc.refused:
                self._replace(link)   # gone or hung: the next refill() starts a new one
            return TrainingChild(self.env)

    def _replace(self, link: _ZygoteLink) -> None:
        with self._lock:
            if self._link is link:
                self._link = None
        link.close()

    def refill(self) -> None:
        with self._lock:
            old, link = self._link, self._link
            if link is None or not link.alive:
                self._link = _ZygoteLink(self.env)
        if old is not None and old is not self._link:
            log.warning("zygote (pid %s) exited with code %s; started a new one (pid %s)", old.proc.pid,
                        old.proc.poll(), self._link.proc.pid if self._link else None)
            old.close()

    def close(self) -> None:
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.close()
