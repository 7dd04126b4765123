"""A real ``gangway up`` subprocess, as a user starts it, seen from the tests."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.integration.helpers import wait_until


@dataclass
class _Proc:
    """What ``assert_nothing_left`` needs of a started process: a pid and ``poll()``."""
    pid: int

    def poll(self):
        return None if psutil.pid_exists(self.pid) else 0


@dataclass
class _Started:
    name: str
    proc: _Proc


class UpFleet:
    """A running ``gangway up`` seen from outside: its processes come from its status file."""

    def __init__(self, settings, proc: subprocess.Popen) -> None:
        self.settings, self.up = settings, proc

    def status(self) -> dict:
        path = Path(self.settings.home) / "supervisor" / f"{self.up.pid}.json"
        return json.loads(path.read_text())["processes"]

    @property
    def started(self) -> list[_Started]:
        return [_Started(name, _Proc(p["pid"])) for name, p in self.status().items()]

    def pid(self, name: str) -> int:
        return self.status()[name]["pid"]

    def output(self) -> str:
        return (Path(self.settings.home) / "up.out").read_text(errors="replace")


@contextlib.contextmanager
def gangway_up(settings, workers: int, *args: str):
    """``gangway up --workers N ARGS`` as a user runs it, with this process's producer pointed at it."""
    Path(settings.home).mkdir(parents=True, exist_ok=True)
    out = open(Path(settings.home) / "up.out", "wb")
    env = {**os.environ, **settings.as_env()}
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "up", "--workers", str(workers), *args], env=env,
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    fleet = UpFleet(settings, proc)
    saved = {k: v for k, v in os.environ.items() if k.startswith("GANGWAY_")}
    os.environ.update(settings.as_env())
    pids: list[int] = []
    try:
        wait_until(lambda: "gangway fleet ready" in fleet.output() or proc.poll() is not None, 180, "gangway up")
        assert proc.poll() is None, fleet.output()
        yield fleet
    finally:
        with contextlib.suppress(Exception):
            pids = [p.proc.pid for p in fleet.started]
        proc.send_signal(signal.SIGINT)   # the product's own stop: drain and stop what it started
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:   # anything it did not stop, by PID
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        for k in [k for k in os.environ if k.startswith("GANGWAY_")]:
            del os.environ[k]
        os.environ.update(saved)
        out.close()
