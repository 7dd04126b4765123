"""The coordinator under the interleavings that hurt: deaths between steps, reports that arrive late, Redis
restarts, clocks that disagree. The real Coordinator, its real Lua scripts and a real Celery app, against a
redis-server of the test's own; faults are injected between two of a step's Redis writes."""
from __future__ import annotations

import json
import tempfile
import time

import pytest
import redis

from common import keys
from common.models import JobState, RankState
from tests.conftest import server_process
from tests.integration.coordination import (  # noqa: F401 (coord is a fixture)
    Killed,
    add_worker,
    assert_consistent,
    coord,
    die_after_the_transition,
    fleet,
    holders,
    make_coordinator,
    spec,
    wait_for_uptime,
    write_status,
)
from workers.local import services

pytestmark = pytest.mark.integration

# d1: stranded gang ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ending", ["cancel", "success", "fail", "retry"])
def test_gang_is_released_when_the_coordinator_dies_between_the_transition_and_the_release(
        coord, monkeypatch, ending):
    state = coord.state
    fleet(state, 2)
    coord.submit(spec("J", 2, max_failures=1))
    token = state.job("J")["token"]
    assert set(holders(state).values()) == {"J"}
    die_after_the_transition(coord, monkeypatch)
    with pytest.raises(Killed):
        if ending == "cancel":
            coord.cancel("J")
        elif ending == "success":
            coord.rank_finished("J", token, 1, True)
            coord.rank_finished("J", token, 0, True)
        elif ending == "fail":
            coord.rank_finished("J", token, 0, False, {"type": "ValueError", "message": "bad data"})
            coord.rank_finished("J", token, 1, False, {"type": "Aborted", "message": "aborted"})
        else:
            coord.rank_finished("J", token, 0, False, {"type": "WorkerLostError", "message": "lost"})
            coord.rank_finished("J", token, 1, False, {"type": "Aborted", "message": "aborted"})
    assert state.job_state("J") is {"cancel": JobState.CANCELLED, "success": JobState.SUCCEEDED,
                                    "fail": JobState.FAILED, "retry": JobState.PENDING}[ending]
    assert set(holders(state).values()) == {""}
    assert not state.r.sismember(keys.RUNNING, "J")
    if ending != "retry":
        assert 0 < state.r.ttl(keys.job("J")) <= coord.settings.job_ttl_days * 86400
    monkeypatch.undo()   # a fresh coordinator: the next job gets the gang
    coord.submit(spec("K", 2))
    assert state.job_state("K") is JobState.RUNNING or (ending == "retry" and state.job_state("J") is JobState.RUNNING)
    assert_consistent(state)


def test_the_reaper_frees_a_worker_whose_reservation_names_an_attempt_that_no_longer_runs(coord):
    state = coord.state
    fleet(state, 3)
    coord.submit(spec("J", 2))
    token = state.job("J")["token"]
    # What an older coordinator, killed mid-step, could leave: J ended, its gang still reserved; and a
    # worker holding J's current token though J's gang does not list it.
    state.r.hset(keys.job("J"), "state", JobState.CANCELLED.value)
    state.r.hset(keys.worker("w2"), mapping={"job": "J", "token": token})
    state.r.hset(keys.worker("w1"), mapping={"job": "GONE", "token": "3"})
    coord.tick()
    assert set(holders(state).values()) == {""}
    assert not state.r.sismember(keys.RUNNING, "J")
    assert_consistent(state)


def test_the_reaper_leaves_a_worker_alone_that_a_running_attempt_holds(coord):
    state = coord.state
    fleet(state, 2)
    coord.submit(spec("J", 2))
    coord.reap()
    assert set(holders(state).values()) == {"J"}


# d7 (issue's defect 7): reap's read-then-remove ---------------------------------------------------------

def test_reap_never_drops_from_the_running_set_a_job_that_a_pass_placed_between_its_read_and_its_removal(
        coord, monkeypatch):
    state = coord.state
    fleet(state, 4)
    coord.submit(spec("J", 2, max_failures=3))
    t1 = state.job("J")["token"]
    real_read = coord._running_records
    interleaved = []

    def read_then_preempted():
        snapshot = real_read()
        if "J" in snapshot and not interleaved:   # the timer has read J; a task thread retries and re-places it
            interleaved.append(1)
            coord.attempt_failed("J", t1, "rank 0 failed: WorkerLostError: lost", "WorkerLostError", {})
            snapshot["J"] = {**snapshot["J"], "state": JobState.PENDING.value}
        return snapshot

    monkeypatch.setattr(coord, "_running_records", read_then_preempted)
    coord.reap()
    monkeypatch.undo()
    job = state.job("J")
    assert interleaved and job["state"] == "RUNNING" and job["token"] != t1
    assert state.r.sismember(keys.RUNNING, "J")
    assert_consistent(state)


# d5 (issue's defect 3): brief loss of liveness -----------------------------------------------------------

def test_a_first_attempt_waits_while_a_registered_worker_is_momentarily_dead_or_draining(coord):
    state = coord.state
    fleet(state, 3)
    state.r.delete(keys.worker_alive("w2"))          # restarting: its heartbeat lapsed for a moment
    state.r.hset(keys.worker("w1"), "draining", "1")  # rolling restart
    coord.submit(spec("A", 3))
    assert state.job_state("A") is JobState.PENDING
    add_worker(state, "w2", 30020)
    add_worker(state, "w1", 30010)                   # back from its restart: it registers again
    coord.schedule_pass()
    assert state.job_state("A") is JobState.RUNNING


def test_a_first_attempt_the_registered_fleet_can_never_hold_fails_once_the_grace_has_passed(coord):
    state = coord.state
    fleet(state, 2)
    coord.submit(spec("A", 3))
    assert state.job_state("A") is JobState.PENDING   # a third worker may be registering right now
    assert "failing in" in state.job("A")["waiting"]
    state.r.hset(keys.job("A"), "never_fits_since", coord.now() - coord.never_fits_grace - 1)
    coord.schedule_pass()
    assert state.job_state("A") is JobState.FAILED
    assert "num_workers=3 requested but the fleet has 2 eligible workers" in state.job("A")["error"]


def test_a_redis_restart_longer_than_the_heartbeat_ttl_fails_neither_the_running_nor_the_queued_job():
    try:
        services.redis_binary()
    except Exception as exc:
        pytest.skip(str(exc))
    port, data = services.free_port(), tempfile.mkdtemp(prefix="gangway-aof-")
    cmd = services.redis_command(port, data, appendfsync="everysec")
    url = f"redis://127.0.0.1:{port}/0"
    with server_process(cmd, port, data) as first:
        client = redis.Redis.from_url(url, decode_responses=True)
        wait_for_uptime(client, 2)
        coord = make_coordinator(url, heartbeat_ttl=2.0, lease_seconds=2.0, rendezvous_timeout=30.0)
        state = coord.state
        fleet(state, 3, ttl=2.0)
        coord.submit(spec("RUN", 2, max_failures=0))
        coord.submit(spec("QUEUED", 3))
        assert (state.job_state("RUN"), state.job_state("QUEUED")) == (JobState.RUNNING, JobState.PENDING)
        first.terminate()   # a clean shutdown fsyncs the append-only file
        first.wait(10)
        time.sleep(3)       # down longer than GANGWAY_HEARTBEAT_TTL: every heartbeat key has expired
        with server_process(cmd, port, "/nonexistent") as _:
            state.r.connection_pool.disconnect()
            coord.tick()    # the timer's first tick lands before the workers' next heartbeat
            for wid in ("w0", "w1", "w2"):
                state.heartbeat(wid, 2.0)
            coord.tick()
            assert (state.job_state("RUN"), state.job_state("QUEUED")) == (JobState.RUNNING, JobState.PENDING)
            assert not state.r.hgetall(f"{keys.job('RUN')}:errors:{state.job('RUN')['token']}")
        coord.app.close()


# d4 (issue's defect 4): reported ranks reaped as silent ------------------------------------------------

def test_a_rank_that_wrote_its_final_status_is_not_reaped_while_its_report_waits_in_the_queue(coord):
    state = coord.state
    fleet(state, 2)
    coord.submit(spec("J", 2, max_failures=0))
    token = state.job("J")["token"]
    # The coordinator is down. Rank 1 finishes: its final status is written, its report is queued.
    write_status(state, "J", token, 1, RankState.SUCCEEDED, summary={"rows": 10})
    time.sleep(coord.settings.lease_seconds + 0.3)   # longer than a lease: rank 1 no longer renews
    write_status(state, "J", token, 0, RankState.TRAINING)   # rank 0 still renews
    coord.tick()   # a restarted coordinator's first tick, before it consumes the queue
    assert state.job_state("J") is JobState.RUNNING
    assert state.r.sismember(keys.job_done("J", token), "1")
    coord.rank_finished("J", token, 1, True, None, {"rows": 10})   # the queued report, now consumed
    write_status(state, "J", token, 0, RankState.SUCCEEDED)
    coord.rank_finished("J", token, 0, True, None, {})
    assert state.job_state("J") is JobState.SUCCEEDED
    assert_consistent(state)


def test_a_rank_whose_final_status_says_it_failed_counts_as_reported_even_if_its_message_is_lost(coord):
    state = coord.state
    fleet(state, 1)
    coord.submit(spec("J", 1, max_failures=0))
    token = state.job("J")["token"]
    write_status(state, "J", token, 0, RankState.FAILED, error={"type": "ValueError", "message": "bad label"})
    coord.tick()
    assert state.job_state("J") is JobState.FAILED
    assert "bad label" in state.job("J")["error"]


# d2 (issue's defect 6): rank status shared across attempts -----------------------------------------------

def test_a_retry_starts_with_no_rank_status_and_is_not_reaped_before_its_first_write(coord):
    state = coord.state
    fleet(state, 2)
    coord.submit(spec("J", 2, max_failures=1))
    t1 = state.job("J")["token"]
    for rank in (0, 1):
        write_status(state, "J", t1, rank, RankState.TRAINING)
    coord.rank_finished("J", t1, 1, False, {"type": "WorkerLostError", "message": "lost"})
    state.r.delete(keys.worker_alive("w1"))   # the retry has to wait for capacity ...
    coord.rank_finished("J", t1, 0, False, {"type": "Aborted", "message": "aborted"})
    assert state.job_state("J") is JobState.PENDING
    time.sleep(coord.settings.lease_seconds + 0.3)   # ... longer than a lease
    add_worker(state, "w2", 30020)
    coord.schedule_pass()
    t2 = state.job("J")["token"]
    assert state.job_state("J") is JobState.RUNNING and t2 != t1
    assert state.ranks("J") == {}   # status() shows this attempt's ranks only
    write_status(state, "J", t2, 0, RankState.FETCHING)
    coord.reap()                     # rank 1 has not written yet: it is within its first lease
    assert state.r.hgetall(f"{keys.job('J')}:errors:{t2}") == {}
    assert state.job_state("J") is JobState.RUNNING


def test_a_rank_that_never_writes_is_lost_once_its_first_lease_ends(coord):
    state = coord.state
    fleet(state, 1)
    coord.submit(spec("J", 1, max_failures=0))
    time.sleep(coord.settings.rendezvous_timeout + coord.settings.lease_seconds + 0.3)
    coord.tick()
    coord.tick()
    assert state.job_state("J") is JobState.FAILED
    assert "never started on worker w0" in state.job("J")["error"]


# clocks (issue's defect 5) ----------------------------------------------------------------------------

def test_a_live_rank_on_a_worker_whose_clock_is_far_behind_is_not_reaped_and_a_silent_one_is(coord):
    state = coord.state
    fleet(state, 2)
    coord.submit(spec("J", 2, max_failures=0))
    token = state.job("J")["token"]
    behind = time.time() - 40   # what rank 1's host thinks the time is
    for _ in range(3):
        write_status(state, "J", token, 0, RankState.TRAINING)
        write_status(state, "J", token, 1, RankState.TRAINING, updated=behind)
        coord.reap()
        time.sleep(coord.settings.lease_seconds / 2)
    assert state.r.hgetall(f"{keys.job('J')}:errors:{token}") == {}
    time.sleep(coord.settings.lease_seconds + 0.3)   # now both go silent
    write_status(state, "J", token, 0, RankState.TRAINING, updated=time.time() + 3600)   # a host far ahead
    coord.reap()
    errors = state.r.hgetall(f"{keys.job('J')}:errors:{token}")
    assert list(errors) == ["1"] and "went silent" in errors["1"]


def test_the_job_timeout_counts_from_when_the_coordinator_accepted_it_not_the_producers_clock(coord):
    state = coord.state
    fleet(state, 1)
    late = spec("J", 1, timeout=30.0)
    late.submitted_at = time.time() - 3600   # a producer whose clock is an hour behind Redis'
    coord.submit(late)
    coord.tick()
    assert state.job_state("J") is JobState.RUNNING


# producer edges (issue's defect 13, the coordinator's part) ---------------------------------------------

def test_a_cancel_that_overtakes_its_submit_keeps_the_job_from_ever_running(coord):
    state = coord.state
    fleet(state, 1)
    assert coord.cancel("J")              # both were queued while the coordinator was down; cancel ran first
    assert coord.submit(spec("J", 1)) is JobState.CANCELLED
    assert state.job_state("J") is JobState.CANCELLED and set(holders(state).values()) == {""}
    assert "cancelled before it was queued" in state.job("J")["error"]
    assert not coord.cancel("J")          # a second cancel of an ended job changes nothing


@pytest.mark.parametrize("workers", [1, 0])
def test_a_redelivered_submit_of_a_cancelled_job_never_runs_it(coord, workers):
    state = coord.state
    fleet(state, workers)
    coord.submit(spec("J", 1))   # running on the one worker, or waiting for one
    assert coord.cancel("J")
    fleet(state, 1)
    assert coord.submit(spec("J", 1)) is JobState.CANCELLED   # the submit task redelivered (not acknowledged)
    coord.tick()
    assert state.job_state("J") is JobState.CANCELLED and set(holders(state).values()) == {""}
    assert not state.r.zscore(keys.PENDING, "J") and not state.r.sismember(keys.RUNNING, "J")
    assert_consistent(state)


def test_a_pruned_dead_workers_queue_and_its_binding_leave_the_broker(redis_url):
    from kombu import Exchange, Queue
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    coord = make_coordinator(redis_url, dead_worker_ttl=0.5)
    try:
        fleet(coord.state, 2, ttl=0.3)
        queue = keys.worker_queue("w0")
        with coord.app.connection_for_write() as conn:   # what the worker's consumer declares
            Queue(queue, Exchange(queue), routing_key=queue)(conn.default_channel).declare()
        coord.app.send_task("gangway.train_rank", args=[{}], queue=queue)   # a message it never took
        assert client.llen(queue) == 1 and client.exists(f"_kombu.binding.{queue}")
        time.sleep(0.4)
        coord.tick()   # dead since now
        time.sleep(0.7)
        coord.tick()
        assert "w0" not in client.smembers(keys.WORKERS)
        assert not client.exists(queue) and not client.exists(f"_kombu.binding.{queue}")
    finally:
        coord.app.close()


# the free-worker index (issue 12: a pass reads the index, not every worker) -------------------------------

def test_a_pass_never_places_a_gang_on_an_indexed_worker_whose_heartbeat_lapsed_and_drops_its_entry(coord):
    state = coord.state
    fleet(state, 3)
    state.r.delete(keys.worker_alive("w0"))   # died while free: its index entry is now stale
    assert state.r.sismember(keys.FREE, "w0")
    coord.submit(spec("J", 2))
    assert state.job_state("J") is JobState.RUNNING
    assert sorted(json.loads(state.job("J")["gang"])["workers"]) == ["w1", "w2"]
    assert state.r.smembers(keys.FREE) == set()   # w0 dropped when picked, w1 and w2 reserved
    state.heartbeat("w0", 60)                      # it comes back: in the index again
    assert state.r.smembers(keys.FREE) == {"w0"}


def test_a_job_that_waits_counts_only_live_workers_as_free_and_a_dead_ones_entry_returns_with_its_heartbeat(coord):
    state = coord.state
    fleet(state, 4)
    coord.submit(spec("A", 1))   # holds w0
    state.r.delete(keys.worker_alive("w3"))   # its host is cut off while it is free
    coord.submit(spec("J", 4))   # 3 indexed for 4 wanted: the plan waits without picking, so no pick meets w3
    assert state.job_state("J") is JobState.PENDING
    assert state.job("J")["waiting"] == "waiting for 4 workers: 2 of 4 registered workers are free (held by job A)"
    assert state.r.smembers(keys.FREE) == {"w1", "w2"}
    coord.cancel("A")
    state.heartbeat("w3", 60)   # back: indexed again, and the next pass places the job
    coord.schedule_pass()
    assert state.job_state("J") is JobState.RUNNING
    assert_consistent(state)


def test_a_gang_released_by_any_ending_re_enters_the_free_index_except_a_draining_worker(coord):
    state = coord.state
    fleet(state, 3)
    coord.submit(spec("J", 3, max_failures=0))
    assert state.r.smembers(keys.FREE) == set()
    state.set_draining("w2")
    coord.cancel("J")
    assert state.r.smembers(keys.FREE) == {"w0", "w1"}
    coord.submit(spec("K", 3))
    assert state.job_state("K") is JobState.PENDING   # the draining worker is not offered
    assert "2 of 3 registered workers are free" in state.job("K")["waiting"]


def test_the_reaper_mends_a_free_index_entry_that_a_direct_write_left_wrong(coord):
    state = coord.state
    fleet(state, 2)
    state.r.hset(keys.worker("w1"), "draining", "1")   # bypassing set_draining: the index still offers w1
    state.r.srem(keys.FREE, "w0")                      # and lost w0
    coord.reap()
    assert state.r.smembers(keys.FREE) == {"w0"}


def test_a_deregistered_worker_leaves_the_index_and_changes_the_registry_epoch(coord):
    state = coord.state
    fleet(state, 2)
    epoch = state.r.get(keys.REGISTRY_EPOCH)
    state.deregister_worker("w1")
    assert state.r.smembers(keys.FREE) == {"w0"} and state.r.get(keys.REGISTRY_EPOCH) != epoch
    coord.submit(spec("J", 2))
    waiting = state.job("J")["waiting"]   # judged on the fleet of 1, not on a cached fleet of 2
    assert state.job_state("J") is JobState.PENDING and "num_workers=2" in waiting and "failing in" in waiting
