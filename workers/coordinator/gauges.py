"""Fleet-wide gauges, read from Redis at scrape time (so a finished job's series simply disappear)."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily

from common import keys
from common.models import JobState, RankState, WorkerState
from common.state import State

WORKER_STATES = ("idle", "reserved", "training", "draining", "dead")
_KINDS = ("xgboost", "lightgbm", "pytorch")


def fleet_gauges(state: State) -> Iterator[GaugeMetricFamily]:
    """Every gauge of the catalogue that describes the fleet as a whole."""
    r = state.r
    yield _single("gangway_coordinator_up", "1 while this coordinator serves metrics.", 1)
    yield _single("gangway_jobs_pending", "Jobs waiting for their gang.", r.zcard(keys.PENDING))
    running = _running_jobs(state)
    fam = GaugeMetricFamily("gangway_jobs_running", "Jobs holding a gang, by framework.", labels=["kind"])
    for kind in sorted(set(_KINDS) | {k for k, _ in running.values()}):
        fam.add_metric([kind], sum(1 for k, _ in running.values() if k == kind))
    yield fam
    yield from _worker_gauges(state, running)
    yield from _job_gauges(running)


def _single(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _running_jobs(state: State) -> dict[str, tuple[str, dict[int, dict]]]:
    """job_id -> (framework, rank statuses) of RUNNING jobs."""
    out = {}
    for job_id in sorted(state.r.smembers(keys.RUNNING)):
        kind, st = state.r.hmget(keys.job(job_id), "framework", "state")
        if st == JobState.RUNNING.value:
            out[job_id] = (kind or "unknown", state.ranks(job_id))
    return out


def _worker_gauges(state: State, running: dict) -> Iterator[GaugeMetricFamily]:
    views = state.workers()
    training_workers = {st.get("worker") for _, ranks in running.values() for st in ranks.values()
                        if st.get("state") == RankState.TRAINING.value}
    counts = dict.fromkeys(WORKER_STATES, 0)
    gpus = {"in_use": 0, "free": 0}
    for w in views:
        s = w.state.value
        if w.state is WorkerState.RESERVED and w.info.worker_id in training_workers:
            s = "training"
        counts[s] += 1
        if w.alive:
            gpus["in_use" if w.job_id else "free"] += w.info.num_gpus
    fam = GaugeMetricFamily("gangway_workers", "Registered trainer workers by state.", labels=["state"])
    for s, n in counts.items():
        fam.add_metric([s], n)
    yield fam
    fam = GaugeMetricFamily("gangway_gpus", "GPUs of live workers, in use by a gang or free.", labels=["state"])
    for s, n in gpus.items():
        fam.add_metric([s], n)
    yield fam
    queues = [keys.COORDINATOR_QUEUE] + [w.info.queue for w in views if w.alive]
    pipe = state.r.pipeline()
    for q in queues:
        pipe.llen(q)
    fam = GaugeMetricFamily("gangway_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"])
    for q, n in zip(queues, pipe.execute()):
        fam.add_metric([q], n)
    yield fam
    pipe = state.r.pipeline()
    alive = [w for w in views if w.alive]
    for w in alive:
        pipe.get(keys.worker_alive(w.info.worker_id))
    now = time.time()
    fam = GaugeMetricFamily("gangway_worker_heartbeat_age_seconds", "Seconds since a live worker's last heartbeat.",
                            labels=["worker"])
    for w, beat in zip(alive, pipe.execute()):
        if beat:
            fam.add_metric([w.info.worker_id], max(0.0, now - float(beat)))
    yield fam


def _job_gauges(running: dict) -> Iterator[GaugeMetricFamily]:
    it = GaugeMetricFamily("gangway_job_iteration", "Newest completed iteration of a running job (rank 0).",
                           labels=["job_id", "kind"])
    ev = GaugeMetricFamily("gangway_job_eval_metric", "Newest eval metric of a running job (rank 0).",
                           labels=["job_id", "kind", "dataset", "metric"])
    for job_id, (kind, ranks) in running.items():
        st = ranks.get(0) or {}
        if st.get("iteration") is not None:
            it.add_metric([job_id, kind], float(st["iteration"]))
        for name, value in _metrics(st.get("metrics")).items():
            dataset, _, metric = name.partition("-") if "-" in name else ("reported", "", name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                ev.add_metric([job_id, kind, dataset, metric], float(value))
    yield it
    yield ev


def _metrics(raw) -> dict:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    return raw if isinstance(raw, dict) else {}
