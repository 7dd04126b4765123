"""The Lua scripts' contracts on a real Redis: all-or-nothing reservation, fencing, compare-and-set."""
from __future__ import annotations

import json
import time

import pytest
import redis

from common import keys
from common.models import JobSpec, JobState, Placement, Resources, WorkerInfo
from common.state import State
from workers.coordinator.reservation import Reservations
from workers.coordinator.scheduler import compute_rendezvous

pytestmark = pytest.mark.integration


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    return client


def _worker(state: State, wid: str, port: int) -> WorkerInfo:
    info = WorkerInfo(wid, "h", "127.0.0.1", keys.worker_queue(wid), port, port + 9, 1)
    state.register_worker(info, ttl=30)
    return info


def _pending_job(r, job_id: str) -> None:
    spec = JobSpec(job_id, "xgboost", Resources(2), {"train": {"uri": "s3://bkt/x/"}})
    r.hset(keys.job(job_id), mapping={"state": "PENDING", "spec": spec.to_json(), "attempt": 0, "token": ""})
    r.zadd(keys.PENDING, {job_id: 1})


def _reserve(r, job_id, wids):
    state = State(r)
    views = {w.info.worker_id: w for w in state.workers()}
    rdv = compute_rendezvous([views[w] for w in wids])
    return Reservations(r).reserve(Placement(job_id, tuple(wids), False), rdv, 30)


def test_a_gang_is_reserved_whole_and_the_job_becomes_running_with_a_fresh_token(r):
    state = State(r)
    _worker(state, "a", 30000)
    _worker(state, "b", 30010)
    _pending_job(r, "j1")
    token, reason = _reserve(r, "j1", ["a", "b"])
    assert token and not reason
    job = state.job("j1")
    assert job["state"] == "RUNNING" and job["token"] == token and job["attempt"] == "1"
    assert json.loads(job["gang"])["workers"] == ["a", "b"]
    assert [w.job_id for w in state.workers()] == ["j1", "j1"]
    assert r.zscore(keys.PENDING, "j1") is None


def test_a_gang_is_not_reserved_if_one_worker_is_busy_and_nothing_changes(r):
    state = State(r)
    _worker(state, "a", 30000)
    _worker(state, "b", 30010)
    _pending_job(r, "j1")
    _pending_job(r, "j2")
    state.r.hset(keys.worker("b"), mapping={"job": "other", "token": "7"})
    token, reason = _reserve(r, "j2", ["a", "b"])
    assert token == "" and reason.startswith("busy:")
    assert r.hget(keys.worker("a"), "job") == ""          # a was not half-reserved
    assert state.job("j2")["state"] == "PENDING"


def test_a_dead_worker_cannot_be_reserved(r):
    state = State(r)
    _worker(state, "a", 30000)
    _worker(state, "b", 30010)
    r.delete(keys.worker_alive("b"))
    _pending_job(r, "j1")
    token, reason = _reserve(r, "j1", ["a", "b"])
    assert token == "" and reason.startswith("dead:") and r.hget(keys.worker("a"), "job") == ""


def test_release_frees_only_workers_held_by_that_attempt(r):
    state = State(r)
    _worker(state, "a", 30000)
    _worker(state, "b", 30010)
    _pending_job(r, "j1")
    token, _ = _reserve(r, "j1", ["a", "b"])
    r.hset(keys.worker("b"), mapping={"job": "j9", "token": "999"})   # b moved on to a newer attempt
    assert Reservations(r).release("j1", "stale-token", ["a", "b"]) == 0
    assert Reservations(r).release("j1", token, ["a", "b"]) == 1
    assert r.hget(keys.worker("a"), "job") == "" and r.hget(keys.worker("b"), "job") == "j9"


def test_a_rank_of_a_stale_attempt_cannot_write(r):
    state = State(r)
    r.hset(keys.job("j1"), mapping={"state": "RUNNING", "token": "5"})
    assert state.fenced_write("j1", "5", 0, {"state": "TRAINING"}, ["[0] ok"])
    assert not state.fenced_write("j1", "4", 0, {"state": "FAILED"}, ["[0] stale"])
    assert state.ranks("j1")[0]["state"] == "TRAINING" and state.log("j1") == ["[0] ok"]


def test_state_transitions_are_compare_and_set(r):
    state = State(r)
    r.hset(keys.job("j1"), mapping={"state": "RUNNING", "token": "5"})
    assert state.transition("j1", (JobState.PENDING,), JobState.CANCELLED) is None
    assert state.transition("j1", (JobState.RUNNING,), JobState.SUCCEEDED, token="4") is None
    assert state.transition("j1", (JobState.RUNNING,), JobState.SUCCEEDED, token="5",
                            finished_at=str(time.time())) is JobState.RUNNING
    assert state.job_state("j1") is JobState.SUCCEEDED
    assert state.transition("j1", (JobState.RUNNING,), JobState.FAILED) is None


def test_a_worker_dead_longer_than_the_ttl_leaves_the_registry_but_live_or_busy_ones_stay(r):
    state = State(r)
    for wid, port in (("gone", 29500), ("busy", 29510), ("live", 29520)):
        _worker(state, wid, port)
    r.delete(keys.worker_alive("gone"), keys.worker_alive("busy"))   # both stopped heartbeating
    r.hset(keys.worker("busy"), "job", "j1")                         # ... one still holds a gang
    assert state.prune_dead_workers(state.workers(), older_than=60) == []   # dead since now: kept
    r.hset(keys.worker("gone"), "dead_since", time.time() - 61)
    r.hset(keys.worker("busy"), "dead_since", time.time() - 61)
    assert state.prune_dead_workers(state.workers(), older_than=60) == ["gone"]
    assert sorted(w.info.worker_id for w in state.workers()) == ["busy", "live"]
    assert not r.exists(keys.worker("gone"))
    _worker(state, "gone", 29500)   # it comes back: registered afresh, no stale dead mark
    assert r.hget(keys.worker("gone"), "dead_since") is None


def test_a_fencing_token_is_not_issued_twice_when_redis_loses_the_counters_last_increment(r):
    fence = Reservations(r)
    first = fence.next_token()
    r.decr(keys.FENCE)   # the increment was lost with the last second of the append-only file
    assert fence.next_token() != first


def test_a_cleanly_stopped_worker_leaves_no_key_without_a_ttl_and_one_back_under_its_id_keeps_its_own(r):
    state = State(r)
    for pid in range(3):   # three restarts of one host's worker, a new id each time
        _worker(state, f"host-{pid}", 30000)
        state.deregister_worker(f"host-{pid}")
    left = r.keys(keys.worker("*"))
    assert left and all(0 < r.ttl(k) <= 86400 for k in left)
    _worker(state, "host-2", 30000)   # a fixed GANGWAY_WORKER_ID comes back
    assert r.ttl(keys.worker("host-2")) == -1


def test_a_worker_back_from_a_heartbeat_gap_is_not_dropped_at_its_next_gap(r):
    state = State(r)
    _worker(state, "w", 29500)
    r.delete(keys.worker_alive("w"))
    state.prune_dead_workers(state.workers(), older_than=60)   # the gap is noticed ...
    r.hset(keys.worker("w"), "dead_since", time.time() - 3600)  # ... an hour ago
    state.heartbeat("w", 30)                                     # it came back
    state.prune_dead_workers(state.workers(), older_than=60)
    r.delete(keys.worker_alive("w"))                             # a new, brief gap
    assert state.prune_dead_workers(state.workers(), older_than=60) == []
    assert [w.info.worker_id for w in state.workers()] == ["w"]
