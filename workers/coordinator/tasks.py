"""Coordinator Celery tasks: decode, call one Coordinator method. Short, acks_late."""
from __future__ import annotations

import logging
import threading

from celery import Celery, signals

from common.models import JobSpec
from workers.coordinator.service import Coordinator

log = logging.getLogger(__name__)

_OPTS = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


def run_timer(coordinator: Coordinator, stop: threading.Event) -> None:
    """Tick at once, then every GANGWAY_SCHEDULE_INTERVAL until ``stop``. A tick that raises (Redis
    restarting, the broker away) is logged and the next one runs: the reaper, the deadlines and the
    coordinator's alive key all hang on this loop."""
    while True:
        try:
            coordinator.tick()
        except Exception:
            log.exception("scheduling timer pass failed")
        if stop.wait(coordinator.settings.schedule_interval):
            return


def start_timer(coordinator: Coordinator, stop: threading.Event) -> threading.Thread:
    """The timer thread; started from ``worker_ready``, whose handlers' errors Celery swallows, so nothing
    that can raise runs before the thread exists."""
    thread = threading.Thread(target=run_timer, args=(coordinator, stop), name="gangway-timer", daemon=True)
    thread.start()
    return thread


def register(app: Celery, coordinator: Coordinator) -> None:
    @app.task(name="gangway.submit_job", **_OPTS)
    def submit_job(spec: dict) -> None:
        coordinator.submit(JobSpec.from_dict(spec))

    @app.task(name="gangway.schedule", **_OPTS)
    def schedule() -> None:
        coordinator.schedule_pass()

    @app.task(name="gangway.rank_finished", **_OPTS)
    def rank_finished(job_id: str, token: str, rank: int, ok: bool, error: dict | None = None,
                      summary: dict | None = None) -> None:
        coordinator.rank_finished(job_id, token, rank, ok, error, summary)

    @app.task(name="gangway.cancel_job", **_OPTS)
    def cancel_job(job_id: str) -> None:
        coordinator.cancel(job_id)

    stop = threading.Event()

    @signals.worker_ready.connect(weak=False)
    def _start_timer(**_):
        start_timer(coordinator, stop)

    @signals.worker_shutdown.connect(weak=False)
    def _stop_timer(**_):
        stop.set()
