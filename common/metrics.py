"""The metrics catalogue (Prometheus, prefix ``gangway_``) and the endpoint every working process serves.

Counters and histograms are recorded where the event happens; fleet-wide gauges
(jobs pending/running, workers by state, queue depth, running jobs' eval metric)
are computed from Redis at scrape time by the coordinator's collector, so a
job's ``job_id`` series vanishes the moment the job ends. Trainer workers are
prefork: the Celery child that runs ``train_rank`` and the main process write
to ``PROMETHEUS_MULTIPROC_DIR`` and the main process serves the sum. Every
series is documented in ``docs/metrics.md``.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_ITER = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# -- coordinator ---------------------------------------------------------------
JOBS_SUBMITTED = Counter("gangway_jobs_submitted", "Jobs accepted by the coordinator.", ["kind"])
JOBS_FINISHED = Counter("gangway_jobs_finished", "Jobs that ended, by outcome (succeeded, failed, cancelled).",
                        ["kind", "outcome"])
JOBS_REJECTED = Counter("gangway_jobs_rejected", "Submissions refused before queueing (invalid, unsigned).",
                        ["reason"])
GANG_WAIT = Histogram("gangway_gang_wait_seconds", "Time from submit (or retry) to the gang being reserved.",
                      ["kind"], buckets=_FAST)
RETRIES = Counter("gangway_job_retries", "Attempts re-queued after an infrastructure failure.", ["kind"])
RANK_FAILURES = Counter("gangway_rank_failures", "Ranks that failed, by reason.", ["kind", "reason"])
SCHEDULING_PASS = Histogram("gangway_scheduling_pass_seconds", "Duration of one scheduling pass.",
                            buckets=_FAST)

# -- trainer workers -----------------------------------------------------------
RENDEZVOUS = Histogram("gangway_rendezvous_seconds",
                       "Time a rank waits at the barrier for its peers (shard fetched to all ranks present).",
                       ["kind"], buckets=_FAST)
FETCH_BYTES = Counter("gangway_shard_fetch_bytes", "Shard bytes read, by source (store or cache).", ["source"])
FETCH_SECONDS = Histogram("gangway_shard_fetch_seconds", "Time to fetch one rank's shard.", buckets=_FAST)
CACHE_LOOKUPS = Counter("gangway_cache_lookups", "Chunk lookups in the worker's local cache, by result.",
                        ["result"])
ITERATIONS = Counter("gangway_training_iterations", "Boosting rounds or reported steps completed by ranks.",
                     ["kind"])
ITERATION_SECONDS = Histogram("gangway_training_iteration_seconds", "Wall time of one training iteration.",
                              ["kind"], buckets=_ITER)
RANKS_FINISHED = Counter("gangway_ranks_finished", "Ranks run by this worker, by outcome.", ["kind", "outcome"])
HEARTBEATS = Counter("gangway_worker_heartbeats", "Heartbeats this worker wrote to the registry.")

FAILURE_REASONS = {
    "ChildProcessError": "process_died", "WorkerLostError": "worker_lost", "RendezvousError": "rendezvous",
    "ProgressTimeoutError": "hung", "WorkerDrainedError": "drained", "StoreError": "store",
    "SecurityError": "security", "Aborted": "aborted", "JobTimeoutError": "timeout",
}


def failure_reason(error_type: str) -> str:
    """A rank error's type folded into a bounded label value; user exceptions are ``training_error``."""
    return FAILURE_REASONS.get(error_type, "training_error")


KINDS = ("xgboost", "lightgbm", "pytorch")


def init_coordinator_series() -> None:
    """Create every known label combination at 0, so a first event is a visible increase to rate()."""
    for kind in KINDS:
        JOBS_SUBMITTED.labels(kind)
        RETRIES.labels(kind)
        for outcome in ("succeeded", "failed", "cancelled"):
            JOBS_FINISHED.labels(kind, outcome)
        for reason in {*FAILURE_REASONS.values(), "training_error"}:
            RANK_FAILURES.labels(kind, reason)
    for reason in ("invalid", "security"):
        JOBS_REJECTED.labels(reason)


def init_worker_series() -> None:
    """The worker's counters at 0 from the start (see init_coordinator_series)."""
    for kind in KINDS:
        ITERATIONS.labels(kind)
        for outcome in ("succeeded", "failed"):
            RANKS_FINISHED.labels(kind, outcome)
    for source in ("store", "cache"):
        FETCH_BYTES.labels(source)
    for result in ("hit", "miss"):
        CACHE_LOOKUPS.labels(result)


def prepare_multiprocess_dir(path: str | os.PathLike) -> str:
    """Empty the multiprocess directory a worker is about to use (stale files from a previous run)."""
    p = Path(path)
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True, exist_ok=True)
    return str(p)


class FunctionCollector(Collector):
    """A collector whose families come from a function called at scrape time."""

    def __init__(self, fn: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self._fn = fn

    def collect(self):
        try:
            yield from self._fn()
        except Exception as exc:   # a broken source (Redis down) must not break the whole scrape
            log.warning("metrics collector failed: %s", exc)

    def describe(self):
        return []


def serve(port: int, *, collectors: Iterable[Collector] = (), addr: str = "0.0.0.0") -> int:
    """Serve /metrics on ``port`` (0 = none) with multiprocess aggregation when configured; the bound port."""
    if not port:
        return 0
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    for c in collectors:
        registry.register(c)
    server, _ = start_http_server(port, addr=addr, registry=registry)
    return server.server_port


def metrics_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/metrics" if port else ""
