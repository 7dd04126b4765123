"""What the coordination tests share: the real Coordinator on a redis-server of the test's own, a
registered fleet without processes, and the invariants every state must satisfy."""
from __future__ import annotations

import json
import time

import pytest
import redis

from common import keys
from common.models import JobSpec, JobState, RankState, Resources, WorkerInfo
from common.settings import Settings
from common.state import State
from workers.celery_app import make_app
from workers.coordinator.service import Coordinator

FAST = dict(heartbeat_ttl=1.0, lease_seconds=1.0, rendezvous_timeout=1.0, kill_grace=0.0,
            schedule_interval=0.2)


class Killed(BaseException):
    """The coordinator process died here (raised where a fault is injected; not an Exception)."""


def wait_for_uptime(client: redis.Redis, seconds: float) -> None:
    """Liveness verdicts wait until Redis has been up a whole TTL; let a fresh server get there."""
    while float(client.info("server")["uptime_in_seconds"]) < seconds:
        time.sleep(0.2)


def make_coordinator(url: str, **overrides) -> Coordinator:
    settings = Settings.from_env({}, broker_url=url, **{**FAST, **overrides})
    client = redis.Redis.from_url(url, decode_responses=True)
    return Coordinator(settings, State(client), make_app(settings))


@pytest.fixture
def coord(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    wait_for_uptime(client, 2)
    c = make_coordinator(redis_url)
    yield c
    c.app.close()


def add_worker(state: State, wid: str, port: int, ttl: float = 60.0) -> None:
    state.register_worker(WorkerInfo(wid, "h", "127.0.0.1", keys.worker_queue(wid), port, port + 9, 1), ttl=ttl)


def fleet(state: State, n: int, ttl: float = 60.0) -> list[str]:
    wids = [f"w{i}" for i in range(n)]
    for i, wid in enumerate(wids):
        add_worker(state, wid, 30000 + 10 * i, ttl)
    return wids


def spec(job_id: str, n: int, max_failures: int = 1, timeout: float = 0.0) -> JobSpec:
    return JobSpec(job_id=job_id, framework="xgboost", resources=Resources(num_workers=n),
                   datasets={"train": {"uri": "s3://b/datasets/x/"}}, submitted_at=time.time(),
                   max_failures=max_failures, timeout=timeout)


def write_status(state: State, job_id: str, token: str, rank: int, rank_state: RankState, **fields) -> bool:
    """What a rank's RankRun.write sends: its state and its own host's clock in ``updated``."""
    status = {"state": rank_state.value, "updated": time.time(), "worker": f"w{rank}", **fields}
    return state.fenced_write(job_id, token, rank, status)


def holders(state: State) -> dict[str, str]:
    return {w.info.worker_id: w.job_id for w in state.workers()}


def die_after_the_transition(coord: Coordinator, monkeypatch) -> None:
    """The coordinator is killed (or Redis/the broker fails) right after a job's state moved."""
    def killed(*_a, **_kw):
        raise Killed("between the state transition and what follows it")
    monkeypatch.setattr(coord, "_end_attempt", killed)


def assert_consistent(state: State) -> None:
    """Every reserved worker belongs to a RUNNING job at its token whose gang lists it; RUNNING <=> watched."""
    r = state.r
    for wid in r.smembers(keys.WORKERS):
        job_id, token = r.hmget(keys.worker(wid), "job", "token")
        if job_id:
            job = state.job(job_id) or {}
            assert job.get("state") == "RUNNING" and job.get("token") == token, (wid, job_id, job.get("state"))
            assert wid in json.loads(job["gang"])["workers"]
    running = r.smembers(keys.RUNNING)
    for job_id in r.zrange(keys.JOBS, 0, -1):
        assert (state.job_state(job_id) is JobState.RUNNING) == (job_id in running), job_id
