"""Coordinator Celery tasks: decode, call one Coordinator method. Short, acks_late."""
from __future__ import annotations

import logging
import threading

from celery import Celery, signals

from common.models import JobSpec
from workers.coordinator.service import Coordinator

log = logging.getLogger(__name__)

_OPTS = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


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

    def timer() -> None:
        while not stop.wait(coordinator.settings.schedule_interval):
            try:
                coordinator.tick()
            except Exception:   # keep the timer alive across Redis hiccups
                log.exception("scheduling timer pass failed")

    @signals.worker_ready.connect(weak=False)
    def _start_timer(**_):
        coordinator.tick()
        threading.Thread(target=timer, name="gangway-timer", daemon=True).start()

    @signals.worker_shutdown.connect(weak=False)
    def _stop_timer(**_):
        stop.set()
