"""``gangway up``: start only what does not already answer, report ``ready``, keep what it started
running (restart with backoff, see ``restart.py``), and stop it on SIGINT/SIGTERM."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from urllib.parse import unquote, urlsplit
from dataclasses import dataclass, field
from pathlib import Path

import redis

from common import keys, metrics
from common.errors import ConfigurationError, GangwayError
from common.settings import Settings
from common.state import State, connect
from common.store import S3Store
from workers.local import services
from workers.local.restart import RestartHistory, RestartPolicy, decide, describe_exit

log = logging.getLogger(__name__)


@dataclass
class Started:
    """A process this fleet started, and what the supervisor knows of it."""
    name: str
    proc: subprocess.Popen
    log: Path
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    started_at: float = field(default_factory=time.monotonic)
    history: RestartHistory = field(default_factory=RestartHistory)
    restart_at: float | None = None     # monotonic time of a scheduled restart
    gave_up: str = ""                   # why it is no longer restarted (crash loop)
    last_exit: str = ""
    restarts: int = 0
    died_at: float | None = None        # set while it is down or not yet serving again

    def status(self) -> dict:
        state = "gave_up" if self.gave_up else "restarting" if self.restart_at is not None else "running"
        return {"state": state, "pid": self.proc.pid, "restarts": self.restarts, "last_exit": self.last_exit,
                "reason": self.gave_up, "log": str(self.log)}


@dataclass
class Fleet:
    settings: Settings
    workers: int = 2
    gpus: bool = False
    gpus_per_worker: int = 1
    started: list[Started] = field(default_factory=list)
    worker_ids: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return Path(self.settings.home)

    def _env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **self.settings.as_env(), "PYTHONUNBUFFERED": "1", **extra}

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        path = self.home / "logs" / f"{name}.log"
        proc = services.spawn(cmd, path, env)
        self.started.append(Started(name, proc, path, cmd, env))
        return proc

    # start -----------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        self.settings = services.bound_settings(self.settings)
        try:
            self._start_redis(deadline)
            self._start_s3(deadline)
            self._start_coordinator()
            self._start_workers()
            self.wait_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def _start_redis(self, deadline: float) -> None:
        host, port = services.redis_address(self.settings.broker_url)
        if services.port_open(host, port):
            self.reused.append(f"redis at {host}:{port}")
            return
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        if self.settings.broker_url.startswith("rediss://"):
            raise ConfigurationError(f"no TLS Redis answers at {self.settings.redacted_broker_url}: the embedded "
                                     "fleet starts plain Redis only; start a TLS Redis yourself and point "
                                     "GANGWAY_BROKER_URL at it")
        password = urlsplit(self.settings.broker_url).password
        password = unquote(password) if password else None
        self._spawn("redis", services.redis_command(port, str(data), password, self.settings.redis_appendfsync,
                                                    bind=self.settings.bind))
        self._wait(lambda: services.port_open(host, port), deadline, f"redis-server on port {port}")

    def _start_s3(self, deadline: float) -> None:
        host, port = services.s3_address(self.settings.s3_url)
        if services.port_open(host, port):
            self.reused.append(f"S3 at {self.settings.s3_url}")
        else:
            self._spawn_weed(host, port, deadline)
        store = S3Store(self.settings)
        self._wait(lambda: _try(lambda: [store.ensure_bucket(b) for b in
                                         (self.settings.data_bucket, self.settings.artifact_bucket)]),
                   deadline, f"S3 buckets at {self.settings.s3_url}")

    def _spawn_weed(self, host: str, port: int, deadline: float, tries: int = 3) -> None:
        """`weed mini` on ``port``; its eight other ports are free ports picked here, so another process can
        take one before weed binds it. A weed that exits before its S3 port opens is started again on fresh
        ports (up to ``tries`` times); the error carries its log."""
        data = self.home / "s3"
        data.mkdir(parents=True, exist_ok=True)
        env = services.weed_env(self.settings.s3_access_key, self.settings.s3_secret_key)
        for attempt in range(1, tries + 1):
            proc = self._spawn("s3", services.weed_command(port, str(data), bind=self.settings.bind), env)
            s = self.started[-1]
            # A weed whose master or filer lost its port may live on without ever serving S3: one try gets
            # its share of the time left, then fresh ports.
            give_up = time.monotonic() + max(30.0, (deadline - time.monotonic()) / (tries - attempt + 1))
            while time.monotonic() < min(deadline, give_up) and proc.poll() is None:
                if services.port_open(host, port):
                    return
                time.sleep(0.1)
            tail = s.log.read_text(errors="replace")[-2000:] if s.log.exists() else ""
            self.started.remove(s)
            _signal_group(proc, signal.SIGKILL)   # it and whatever it started in its group
            proc.wait(timeout=10)
            if attempt == tries or time.monotonic() >= deadline:
                how = "did not answer" if proc.returncode == -signal.SIGKILL else f"exited with code {proc.returncode}"
                raise GangwayError(f"weed mini S3 on port {port} {how} ({attempt} tries); log {s.log}:\n{tail}")

    def _celery(self, module: str, queue: str, name: str, pool: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", module, "worker", "-Q", queue, "-n", name, "-P", pool,
                "-c", "1", "--without-gossip", "--without-mingle", "-l", "INFO"]

    def _start_coordinator(self) -> None:
        if State(connect(self.settings)).coordinator_alive():
            self.reused.append("coordinator")
            return
        env = self._env(GANGWAY_METRICS_PORT=str(self._metrics_port(0)))
        env.pop(metrics.MULTIPROC_ENV, None)   # one process: plain registry
        self._spawn("coordinator", self._celery("workers.coordinator.main", keys.COORDINATOR_QUEUE,
                                                f"coordinator-{uuid.uuid4().hex[:6]}@%h", "solo"), env)

    def _metrics_port(self, index: int) -> int:
        """GANGWAY_METRICS_PORT + index when set (coordinator 0, worker i at i + 1), else a free port."""
        base = self.settings.metrics_port
        return base + index if base else services.free_port()

    def _start_workers(self) -> None:
        lo, hi = self.settings.port_block
        size = hi - lo + 1
        cpus = max(1, (os.cpu_count() or 1) // max(1, self.workers))
        per_worker = gpu_split(_gpu_ids(), self.workers, self.gpus_per_worker) if self.gpus else []
        tag = uuid.uuid4().hex[:6]
        for i in range(self.workers):
            wid = f"w{i}-{tag}"
            block = f"{lo + i * size}-{lo + i * size + size - 1}"
            extra = {"GANGWAY_WORKER_ID": wid, "GANGWAY_WORKER_PORTS": block,
                     "GANGWAY_WORKER_CPUS": str(self.settings.worker_cpus or cpus),
                     "GANGWAY_WORKER_GPUS": per_worker[i] if self.gpus else "none",
                     "GANGWAY_METRICS_PORT": str(self._metrics_port(i + 1)),
                     metrics.MULTIPROC_ENV: metrics.prepare_multiprocess_dir(self.home / "metrics" / wid)}
            if self.gpus:
                extra["CUDA_VISIBLE_DEVICES"] = per_worker[i]
            self._spawn(f"worker-{wid}", self._celery("workers.runtime.main", keys.worker_queue(wid),
                                                      f"{wid}@%h", "prefork"), self._env(**extra))
            self.worker_ids.append(wid)

    def wait_ready(self, deadline: float) -> None:
        state = State(connect(self.settings))

        def ready() -> bool:
            self._check_alive()
            alive = {w.info.worker_id for w in state.workers() if w.alive}
            return set(self.worker_ids) <= alive and state.coordinator_alive()

        self._wait(ready, deadline, f"{len(self.worker_ids)} workers to register")

    def _check_alive(self) -> None:
        for s in self.started:
            if s.proc.poll() is not None:
                tail = s.log.read_text(errors="replace")[-2000:] if s.log.exists() else ""
                raise GangwayError(f"{s.name} exited with code {s.proc.returncode}; log {s.log}:\n{tail}")

    @staticmethod
    def _wait(pred, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.1)
        raise GangwayError(f"timed out waiting for {what}")

    # stop ------------------------------------------------------------------
    def stop(self, grace: float = 15.0) -> None:
        """Stop exactly the processes this fleet started, workers first, servers last."""
        for s in reversed(self.started):
            _signal_group(s.proc, signal.SIGTERM)
            end = time.monotonic() + grace
            while s.proc.poll() is None and time.monotonic() < end:
                time.sleep(0.05)
            if s.proc.poll() is None:
                _signal_group(s.proc, signal.SIGKILL)
                s.proc.wait(timeout=10)
            _signal_group(s.proc, signal.SIGKILL)   # stragglers left in its group
        self.started.clear()
        self.status_path.unlink(missing_ok=True)

    # supervise ---------------------------------------------------------------
    @property
    def status_path(self) -> Path:
        """Where ``gangway check`` reads what this supervisor gave up on."""
        return self.home / "supervisor" / f"{os.getpid()}.json"

    def supervise_once(self, policy: RestartPolicy = RestartPolicy(), now: float | None = None) -> list[str]:
        """Restart what exited (after its backoff); returns one line per event for the operator."""
        now = time.monotonic() if now is None else now
        events = [e for s in self.started for e in (self._supervise(s, policy, now),) if e]
        if events:
            self.write_status()
        return events

    def _supervise(self, s: Started, policy: RestartPolicy, now: float) -> str:
        if s.gave_up:
            return ""
        if s.died_at is not None and s.restart_at is None and s.proc.poll() is None and self._serving(s):
            down, s.died_at = now - s.died_at, None
            return f"{s.name} is back (pid {s.proc.pid}), serving {down:.1f} s after it died"
        if s.restart_at is not None:
            return self._restart(s, now) if now >= s.restart_at else ""
        if s.proc.poll() is None:
            return ""
        s.last_exit = describe_exit(s.proc.returncode)
        s.died_at = now if s.died_at is None else s.died_at
        decision = decide(policy, s.history, s.started_at, now)
        s.history = decision.history
        if decision.give_up:
            s.gave_up = decision.reason
            _signal_group(s.proc, signal.SIGKILL)
            return f"{s.name} (pid {s.proc.pid}) {s.last_exit}; {decision.reason}; log {s.log}"
        s.restart_at = now + decision.delay
        return f"{s.name} (pid {s.proc.pid}) {s.last_exit}; {decision.reason}"

    def _restart(self, s: Started, now: float) -> str:
        _signal_group(s.proc, signal.SIGKILL)   # prefork children of a SIGKILLed worker would keep consuming
        s.proc = services.spawn(s.cmd, s.log, s.env)
        s.started_at, s.restart_at = now, None
        s.restarts += 1
        return f"{s.name} restarted (pid {s.proc.pid}, restart {s.restarts})"

    def _serving(self, s: Started) -> bool:
        """Registered (workers, coordinator) or answering on its port (Redis, S3) with its new pid."""
        try:
            if s.name == "redis":
                return services.port_open(*services.redis_address(self.settings.broker_url))
            if s.name == "s3":
                return services.port_open(*services.s3_address(self.settings.s3_url))
            state = State(connect(self.settings))
            if s.name == "coordinator":
                return state.coordinator_alive() and state.r.hget(keys.COORDINATOR_INFO, "pid") == str(s.proc.pid)
            wid = s.name.removeprefix("worker-")
            return any(w.alive and w.info.pid == s.proc.pid for w in state.workers() if w.info.worker_id == wid)
        except (redis.RedisError, OSError):
            return False

    def write_status(self) -> None:
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "processes": {s.name: s.status() for s in self.started}}))
        tmp.replace(self.status_path)

    def describe(self) -> str:
        mine = ", ".join(s.name for s in self.started)
        reused = ", ".join(self.reused) or "nothing"
        return f"started: {mine or 'nothing'}; reused: {reused}"


def gpu_split(gpu_ids: list[str], workers: int, per_worker: int) -> list[str]:
    """``GANGWAY_WORKER_GPUS`` of each of ``workers`` workers owning ``per_worker`` GPUs each, disjoint."""
    if per_worker < 1:
        raise ConfigurationError(f"--gpus-per-worker must be >= 1, got {per_worker}")
    if len(gpu_ids) < workers * per_worker:
        raise ConfigurationError(f"--gpus with {workers} workers x {per_worker} GPUs each needs "
                                 f"{workers * per_worker} GPUs but this host has {len(gpu_ids)} ({gpu_ids})")
    return [",".join(gpu_ids[i * per_worker:(i + 1) * per_worker]) for i in range(workers)]


def given_up(home: str | Path) -> list[str]:
    """Processes that a live ``gangway up`` on this ``GANGWAY_HOME`` stopped restarting, one line each."""
    out = []
    for path in sorted((Path(home) / "supervisor").glob("*.json")):
        try:
            status = json.loads(path.read_text())
            os.kill(int(status["pid"]), 0)
        except (OSError, ValueError, KeyError):
            continue   # a supervisor that is gone (or a file being replaced) says nothing
        out += [f"{name} {p['last_exit']}; {p['reason']} (gangway up pid {status['pid']}; log {p['log']})"
                for name, p in status["processes"].items() if p["state"] == "gave_up"]
    return out


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _try(fn) -> bool:
    try:
        fn()
        return True
    except (GangwayError, redis.RedisError, OSError):
        return False


def _gpu_ids() -> list[str]:
    from workers.runtime.gpus import detect_gpus
    return detect_gpus()
