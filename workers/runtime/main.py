"""Entry point of one trainer worker: ``gangway worker`` runs Celery on this module's ``app``.

The main process registers and heartbeats; ``train_rank`` runs in the prefork
child, which supervises the training subprocess.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from celery import signals

from common import keys, metrics
from common.settings import Settings, advertised_host
from common.state import State, connect
from workers.celery_app import make_app
from workers.runtime.gpus import gpu_gauges, worker_gpus
from workers.runtime.rank import run_rank, sweep_rank_dirs
from workers.runtime.registry import Drain, Heartbeat, worker_info
from workers.runtime.supervisor import Standby, Zygote

log = logging.getLogger(__name__)

settings = advertised_host(Settings.from_env())   # peers dial this address
app = make_app(settings)
GPUS = worker_gpus(settings.worker_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
INFO = worker_info(settings, GPUS)
_child_env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1"}
if GPUS:
    _child_env["CUDA_VISIBLE_DEVICES"] = ",".join(GPUS)
_standby = Zygote(_child_env, settings.zygote_timeout) if settings.zygote else Standby(_child_env)
_heartbeat: Heartbeat | None = None
_state: State | None = None


def _get_state() -> State:
    global _state
    if _state is None:
        _state = State(connect(settings, ride_out=True))
    return _state


@app.task(name="gangway.train_rank", acks_late=False, ignore_result=True)
def train_rank(payload: dict) -> dict:
    """Run one rank of one attempt (acknowledged on receipt: leases, not redelivery, decide reruns)."""
    return run_rank(settings, _get_state(), app, _standby, payload)


@signals.worker_process_init.connect(weak=False)
def _warm_pool_child(**_) -> None:
    global _state
    _state = None       # never share a Redis connection across fork
    _standby.refill()
    from workers.runtime.artifacts import artifact_store
    artifact_store(settings)   # build the S3 client now, not inside rank 0's critical path


@signals.worker_process_shutdown.connect(weak=False)
def _close_pool_child(**_) -> None:
    _standby.close()


@signals.worker_ready.connect(weak=False)
def _register(**_) -> None:
    global _heartbeat
    # Nothing here may keep the worker from registering (Celery logs and swallows a signal handler's error).
    try:
        registered = _get_state().r.smembers(keys.WORKERS)
    except Exception as exc:   # no registry to ask: sweep only our own folder
        log.warning("worker %s: could not read the registry (%s); sweeping only its own rank folders",
                    INFO.worker_id, exc)
        registered = None
    try:
        sweep_rank_dirs(settings, INFO.worker_id, registered)
    except OSError as exc:
        log.error("worker %s: could not sweep its rank folders: %s", INFO.worker_id, exc)
    # Served by the main process; the prefork child writes to the same PROMETHEUS_MULTIPROC_DIR.
    metrics.init_worker_series()
    try:
        port = metrics.serve(settings.metrics_port, collectors=[metrics.FunctionCollector(lambda: gpu_gauges(GPUS))])
    except OSError as exc:
        port = 0
        log.error("worker %s: no metrics endpoint on port %s (GANGWAY_METRICS_PORT): %s", INFO.worker_id,
                  settings.metrics_port, exc)
    info = dataclasses.replace(INFO, metrics_url=metrics.metrics_url(settings.worker_host, port))
    _heartbeat = Heartbeat(settings, _get_state(), app, info)
    _heartbeat.start()


_drainer: Drain | None = None


@signals.worker_shutting_down.connect(weak=False)
def _drain(**_) -> None:
    global _drainer
    if _drainer is None:
        _drainer = Drain(settings, _get_state(), app, INFO.worker_id)
    if _heartbeat is not None:
        _heartbeat.draining = True
    _drainer.start()


@signals.worker_shutdown.connect(weak=False)
def _deregister(**_) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
