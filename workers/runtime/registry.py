"""Trainer worker registration: advertise on start, heartbeat on a TTL, deregister on clean stop."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from celery import Celery

from common import keys, metrics
from common.models import WorkerInfo
from common.settings import Settings
from common.state import State

log = logging.getLogger(__name__)


def worker_info(settings: Settings, gpus: tuple[str, ...]) -> WorkerInfo:
    lo, hi = settings.port_block
    wid = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    return WorkerInfo(worker_id=wid, host=socket.gethostname(), address=settings.worker_host,
                      queue=keys.worker_queue(wid), port_lo=lo, port_hi=hi,
                      cpus=settings.worker_cpus or os.cpu_count() or 1, gpus=gpus,
                      pid=os.getpid(), started_at=time.time())


class Heartbeat:
    """Registers the worker, keeps its alive key fresh, and asks for a scheduling pass."""

    def __init__(self, settings: Settings, state: State, app: Celery, info: WorkerInfo) -> None:
        self.settings, self.state, self.app, self.info = settings, state, app, info
        self.draining = False   # set by Drain: a re-registration (Redis lost its state) keeps saying so
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gangway-heartbeat", daemon=True)

    def start(self) -> None:
        try:
            report_lost_rank(self.state, self.app, self.info.worker_id)
        except Exception as exc:   # never keep a worker from registering
            log.warning("worker %s could not check for a rank its predecessor lost: %s", self.info.worker_id, exc)
        self.state.register_worker(self.info, self.settings.heartbeat_ttl)
        log.info("worker %s registered (queue %s, ports %s-%s, gpus %s)", self.info.worker_id,
                 self.info.queue, self.info.port_lo, self.info.port_hi, list(self.info.gpus) or "none")
        self.app.send_task("gangway.schedule", queue=keys.COORDINATOR_QUEUE)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            try:
                if not self.state.r.exists(keys.worker(self.info.worker_id)) or \
                        not self.state.r.sismember(keys.WORKERS, self.info.worker_id):
                    self.state.register_worker(self.info, self.settings.heartbeat_ttl,   # Redis lost its state
                                               draining=self.draining)
                    self.app.send_task("gangway.schedule", queue=keys.COORDINATOR_QUEUE)
                else:
                    self.state.heartbeat(self.info.worker_id, self.settings.heartbeat_ttl)
                metrics.HEARTBEATS.inc()
            except Exception as exc:   # keep beating through Redis restarts
                log.warning("worker %s heartbeat failed: %s", self.info.worker_id, exc)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.state.deregister_worker(self.info.worker_id)
        except Exception as exc:
            log.warning("worker %s could not deregister: %s", self.info.worker_id, exc)


def report_lost_rank(state: State, app: Celery, worker_id: str) -> None:
    """A worker restarted under the same id (``gangway up`` restarts what dies) while its predecessor ran a
    rank: that rank is gone. Say so now, as a retryable ``WorkerLostError``, instead of leaving the
    coordinator to notice a silent lease; a rank that was only queued (no status of this attempt from
    this worker yet) will still be delivered to us, so it is left alone."""
    job_id, token = state.r.hmget(keys.worker(worker_id), "job", "token")
    if not job_id or not token:
        return
    gang = json.loads(state.r.hget(keys.job(job_id), "gang") or "{}").get("workers", [])
    if worker_id not in gang:
        return
    rank = gang.index(worker_id)
    status = state.ranks(job_id).get(rank) or {}
    if status.get("worker") != worker_id or status.get("token") != token:
        return
    log.warning("worker %s restarted while running rank %s of job %s; reporting the rank lost", worker_id, rank,
                job_id)
    app.send_task("gangway.rank_finished", queue=keys.COORDINATOR_QUEUE, args=[
        job_id, token, rank, False, {"type": "WorkerLostError", "traceback": "",
                                     "message": f"worker {worker_id} died and was restarted while it ran rank "
                                                f"{rank} (its training process is gone)"}, None],
        argsrepr=f"job_id={job_id} rank={rank} ok=False error=WorkerLostError")


class Drain:
    """SIGTERM: take no new gang; let the running rank finish for ``drain_grace`` seconds, then hand its
    attempt back to the coordinator (a retryable ``WorkerDrainedError``) so it is retried elsewhere."""

    def __init__(self, settings: Settings, state: State, app: Celery, worker_id: str) -> None:
        self.settings, self.state, self.app, self.worker_id = settings, state, app, worker_id
        self._started = threading.Event()

    def start(self) -> None:
        if self._started.is_set():
            return
        self._started.set()
        threading.Thread(target=self._run, name="gangway-drain", daemon=True).start()

    def _run(self) -> None:
        key = keys.worker(self.worker_id)
        try:
            self.state.set_draining(self.worker_id)
        except Exception as exc:
            log.warning("worker %s could not mark itself draining: %s", self.worker_id, exc)
            return
        log.info("worker %s draining: no new gangs; a running rank gets %ss", self.worker_id,
                 self.settings.drain_grace)
        deadline = time.monotonic() + self.settings.drain_grace
        while time.monotonic() < deadline:
            if not self.state.r.hget(key, "job"):
                return
            time.sleep(0.5)
        job_id, token = self.state.r.hmget(key, "job", "token")
        if not job_id:
            return
        gang = json.loads(self.state.r.hget(keys.job(job_id), "gang") or "{}").get("workers", [])
        rank = gang.index(self.worker_id) if self.worker_id in gang else 0
        log.warning("worker %s: rank %s of job %s did not finish within GANGWAY_DRAIN_GRACE=%ss; handing the "
                    "attempt back", self.worker_id, rank, job_id, self.settings.drain_grace)
        self.app.send_task("gangway.rank_finished", queue=keys.COORDINATOR_QUEUE, args=[
            job_id, token, rank, False, {"type": "WorkerDrainedError", "traceback": "",
                                         "message": f"worker {self.worker_id} was shut down (SIGTERM) and its rank "
                                                    f"did not finish within GANGWAY_DRAIN_GRACE="
                                                    f"{self.settings.drain_grace:g}s"}, None],
            argsrepr=f"job_id={job_id} rank={rank} ok=False error=WorkerDrainedError")
