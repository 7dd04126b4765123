"""Entry point of the coordinator process: ``celery -A workers.coordinator.main worker -Q gangway.coordinator``."""
from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from celery import signals

from common import keys, metrics
from common.settings import Settings, advertised_host
from common.state import State, connect
from workers.celery_app import make_app
from workers.coordinator.gauges import fleet_gauges
from workers.coordinator.service import Coordinator
from workers.coordinator.tasks import register

log = logging.getLogger(__name__)
_PUBLISHERS = 4   # jobs whose artifacts are copied at once, off the task loop

settings = advertised_host(Settings.from_env())
app = make_app(settings)
coordinator = Coordinator(settings, State(connect(settings, ride_out=True)), app)
coordinator.publishing = ThreadPoolExecutor(_PUBLISHERS, thread_name_prefix="gangway-publish")
register(app, coordinator)


@signals.worker_shutdown.connect(weak=False)
def _stop_publishing(**_) -> None:
    """Finish the publications under way; queued ones stay registered in gw:staged for the next sweep."""
    coordinator.publishing.shutdown(wait=True, cancel_futures=True)


@signals.worker_ready.connect(weak=False)
def _serve_metrics(**_) -> None:
    """/metrics on GANGWAY_METRICS_PORT, its URL advertised in Redis for `gangway fleet --json`."""
    metrics.init_coordinator_series()
    gauges_state = State(connect(settings))   # its own connection: scrapes come from the server's thread
    try:
        port = metrics.serve(settings.metrics_port, collectors=[metrics.FunctionCollector(
            lambda: fleet_gauges(gauges_state))])
    except OSError as exc:   # never keep the coordinator from coordinating
        port = 0
        log.error("no coordinator metrics on port %s (GANGWAY_METRICS_PORT): %s", settings.metrics_port, exc)
    url = metrics.metrics_url(settings.worker_host, port)
    coordinator.advertise = {"metrics_url": url, "host": socket.gethostname(), "pid": os.getpid(),
                             "started_at": time.time()}
    coordinator.r.hset(keys.COORDINATOR_INFO, mapping=coordinator.advertise)
    log.info("coordinator metrics at %s", url or "(none: GANGWAY_METRICS_PORT=0)")
