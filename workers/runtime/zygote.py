"""The zygote: ``python -m workers.runtime.zygote FD``, one per trainer worker.

It imports the heavy modules once (pyarrow, XGBoost, LightGBM, the S3 client) and then forks each
training child on request, in milliseconds, instead of every job paying ~1.8 s of imports in a fresh
``python -m workers.runtime.child``. The supervisor (``supervisor.Zygote``) talks to it over the
SOCK_SEQPACKET socket ``FD``, one JSON message each way:

- supervisor -> zygote: ``{"id", "env", "cwd"}`` with three file descriptors (SCM_RIGHTS): the read
  end of the child's stdin pipe and the write ends of its stdout and stderr pipes. The supervisor keeps
  the other ends, so the event protocol is exactly that of a spawned child.
- zygote -> supervisor: ``{"id", "pid"}`` once forked (or ``{"id", "refused"}``), and later
  ``{"exit": pid, "code": c}`` when the zygote reaps it (``c`` as ``Popen.returncode``: ``-N`` for signal N).

The forked child starts its own session (``kill`` of its group kills what train_func forks), re-arms
``PR_SET_PDEATHSIG`` (it dies with the zygote, which dies with its supervisor), takes the request's
environment and working directory, and runs ``child.serve``. The zygote never starts a thread: a fork
copies only the calling thread, so a Python thread holding a lock at fork time would deadlock the child;
it refuses to fork (the supervisor spawns instead) if one exists. Native threads that libraries start at
import (jemalloc's background thread, Arrow's and XGBoost's idle pools) have their own fork handlers, as
for any ``multiprocessing`` fork. CUDA is never initialised here: ``CUDA_VISIBLE_DEVICES`` is the
request's, applied before the training code runs. Torch is not imported ahead (+180 MiB per idle worker,
measured in docs/architecture.md); its jobs import it after the fork, as before.
"""
from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import sys
import threading
import traceback

from workers.runtime import child
from workers.runtime.supervisor import _die_with_parent

# LightGBM costs +44 MiB RSS and 0.5 s once per worker here, where it cost that in every standby child.
PREIMPORT = (*child.PREIMPORT, "workers.runtime.lightgbm_runner")
_MAX_MESSAGE = 1 << 20


class Server:
    """The zygote's loop: fork on request, reap and report exits; ends when the supervisor goes."""

    def __init__(self, ctl: socket.socket) -> None:
        self.ctl = ctl
        self.pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)   # a handler, so the wakeup fd hears every exit
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.ctl, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)

    def run(self) -> int:
        while True:
            for key, _ in self._sel.select():
                if key.fileobj is self._wake_r:
                    self._drain_wakeups()
                elif not self._handle_request():
                    return 0   # the supervisor closed its end: our children die with us (PDEATHSIG)
            self._reap()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def _send(self, msg: dict) -> None:
        try:
            self.ctl.send(json.dumps(msg).encode())
        except OSError:
            pass   # the supervisor is gone; the next recv ends the loop

    def _handle_request(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.ctl, _MAX_MESSAGE, 3)
        except OSError:
            return False
        if not data:
            return False
        req = json.loads(data)
        try:
            if threading.active_count() != 1 or len(fds) != 3:
                why = (f"{threading.active_count()} Python threads in the zygote" if len(fds) == 3
                       else f"{len(fds)} file descriptors sent, expected 3")
                self._send({"id": req["id"], "refused": why})
                return True
            sys.stdout.flush()
            sys.stderr.flush()
            ready_r, ready_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(ready_r)
                self._become_child(req, fds, ready_w)   # never returns
            os.close(ready_w)
            try:
                os.read(ready_r, 1)   # its session exists before the supervisor may signal the group
            finally:
                os.close(ready_r)
            self._send({"id": req["id"], "pid": pid})
        finally:
            for fd in fds:
                os.close(fd)   # the child holds its copies; ours would keep the supervisor from seeing EOF
        return True

    def _become_child(self, req: dict, fds: list[int], ready: int) -> None:
        code = 1
        try:
            os.setsid()   # its own session and process group, as a spawned child's start_new_session
            _die_with_parent()
            if os.getppid() != self.pid:   # the zygote died before the death signal was armed
                os._exit(1)
            os.close(ready)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._sel.close()
            self.ctl.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in fds:
                os.close(fd)
            os.environ.clear()
            os.environ.update(req["env"])
            os.chdir(req.get("cwd") or "/")
            sys.argv = [child.__file__]   # what a spawned ``python -m workers.runtime.child`` sees
            _reseed()
            code = child.serve(child.protocol_stream())
        except BaseException:  # noqa: BLE001  whatever happens, this process must never return into the loop
            try:
                traceback.print_exc()
            except BaseException:  # noqa: BLE001, S110  (no stderr left to say it on)
                pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


def _reseed() -> None:
    """A fork copies the zygote's random state: give each child its own, as a fresh process has."""
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def main() -> int:
    from common.settings import Settings
    ctl = socket.socket(fileno=int(sys.argv[1]))
    settings = Settings.from_env()
    child._preimport(settings, PREIMPORT)
    # What the imports made is never freed: keep it out of the collector's scans, whose reference-count
    # writes would copy every page of it into each forked child (copy-on-write) at the child's first collection.
    gc.freeze()
    if threading.active_count() != 1:
        print(f"gangway zygote: {threading.active_count()} Python threads after imports; every request "
              "will be refused (spawned children instead)", file=sys.stderr, flush=True)
    return Server(ctl).run()


if __name__ == "__main__":
    sys.exit(main())
