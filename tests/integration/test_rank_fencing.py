"""A rank's long, quiet phases against the real coordinator on a real Redis: rank 0's artifact upload keeps
its lease and stops once its attempt ends; only the attempt that won is published to the model folder, and
nothing is for a job that did not succeed; a rank at the barrier notices a refused renewal."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
import redis

from common import keys
from common.models import JobState, RankState
from common.store import MemoryStore
from tests.integration.coordination import Killed, coord, fleet, make_coordinator, spec  # noqa: F401 (fixture)
from workers.runtime import rank as rankmod

pytestmark = pytest.mark.integration


class SlowStore(MemoryStore):
    """The in-memory store, each object taking ``seconds`` to write (a slow or retrying S3)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def put(self, bucket: str, key: str, data: bytes) -> None:
        time.sleep(self.seconds)
        super().put(bucket, key, data)


def rank_payload(job: dict, rank: int, world: int) -> dict:
    """The first attempt's train_rank payload of job J for ``rank`` (on worker w<rank>)."""
    return {"job_id": "J", "token": job["token"], "rank": rank, "worker_id": f"w{rank}", "attempt": 1,
            "rendezvous": {"world_size": world}, "spec": json.loads(job["spec"])}


def rank0_done_training(coord, tmp_path, files: int, *, first: bool = True, worker_lease: float | None = None):
    """Job J on two workers; rank 1 has succeeded and rank 0's child left ``files`` model files.
    ``worker_lease``: rank 0's worker has its own GANGWAY_LEASE_SECONDS (and the coordinator's payload)."""
    state = coord.state
    if first:
        fleet(state, 2)
        coord.submit(spec("J", 2, max_failures=1))
    job = state.job("J")
    assert job["state"] == JobState.RUNNING.value, job
    payload = rank_payload(job, 0, 2)
    settings = coord.settings
    if worker_lease is not None:
        payload["lease_seconds"] = coord.settings.lease_seconds   # what the coordinator's train_rank carries
        settings = settings.replace(lease_seconds=worker_lease)
    run = rankmod.RankRun(settings, state, payload)
    run.write(RankState.TRAINING)
    coord.rank_finished("J", job["token"], 1, True)
    for old in tmp_path.iterdir():
        old.unlink()
    for i in range(files):
        (tmp_path / f"part{i}.bin").write_bytes(os.urandom(64))
    return run, rankmod.AbortWatcher(state, "J", job["token"])


def staged_by_rank0(coord, run, abort, tmp_path, store):
    """Rank 0's files staged into ``store`` (then the coordinator's store); the abort watcher closed."""
    store.ensure_bucket(coord.settings.artifact_bucket)
    try:
        rankmod.publish_artifacts(coord.settings, coord.state, run, abort, str(tmp_path), store=store)
    finally:
        abort.close()
    coord._store = store
    return store


def model_folder(coord, store) -> list[str]:
    return store.list(coord.settings.artifact_bucket, "model/J/")


def staged(coord, store) -> list[str]:
    return store.list(coord.settings.artifact_bucket, "staging/J/")


@pytest.mark.parametrize("worker_lease", [None, 30.0], ids=["same-settings", "worker-says-30s"])
def test_an_artifact_upload_longer_than_the_lease_keeps_the_attempt_and_writes_once(coord, tmp_path, worker_lease):
    # The coordinator's leases last 1 s (FAST): the rank renews three times a lease of the coordinator's,
    # whatever its own worker's GANGWAY_LEASE_SECONDS says (renewing every 3 s, it was reaped as silent)
    run, abort = rank0_done_training(coord, tmp_path, files=6, worker_lease=worker_lease)
    store = SlowStore(0.5)   # 3.5 s in all, 3.5 leases of 1 s
    stop, ticks = threading.Event(), []

    def timer():
        while not stop.wait(0.2):
            coord.tick()
            ticks.append(1)
    thread = threading.Thread(target=timer)
    thread.start()
    try:
        uri = rankmod.publish_artifacts(coord.settings, coord.state, run, abort, str(tmp_path), store=store)
    finally:
        stop.set()
        thread.join()
        abort.close()
    job = coord.state.job("J")
    assert len(ticks) >= 10 and job["state"] == JobState.RUNNING.value and job["attempt"] == "1"
    assert not coord.state.r.hgetall(f"gw:job:J:errors:{job['token']}")
    assert model_folder(coord, store) == []   # staged: nothing is published before the attempt has won
    coord._store = store
    coord.rank_finished("J", job["token"], 0, True)
    assert coord.state.job("J")["published"] == job["token"]
    meta = json.loads(store.get(coord.settings.artifact_bucket, "model/J/metadata.json"))
    assert uri.endswith("/model/J/") and meta["token"] == job["token"] and len(meta["files"]) == 6
    assert len(model_folder(coord, store)) == 7 and staged(coord, store) == []


def test_an_upload_stops_at_the_next_object_once_its_attempt_has_ended(coord, tmp_path):
    run, abort = rank0_done_training(coord, tmp_path, files=20)
    store = SlowStore(0.2)
    threading.Timer(0.5, coord.cancel, args=["J"]).start()   # cancelled while rank 0 uploads
    try:
        with pytest.raises(rankmod.Aborted, match="while its artifacts were being written"):
            rankmod.publish_artifacts(coord.settings, coord.state, run, abort, str(tmp_path), store=store)
    finally:
        abort.close()
    written = staged(coord, store)
    assert coord.state.job_state("J") is JobState.CANCELLED
    assert 0 < len(written) < 20 and not any(k.endswith("metadata.json") for k in written)
    coord._store = store
    coord.tick()   # the sweep deletes what the cancelled attempt staged
    assert staged(coord, store) == [] and model_folder(coord, store) == []


def test_only_the_attempt_that_won_is_published_when_a_slow_upload_loses_its_attempt(coord, tmp_path):
    coord._store = store = SlowStore(0.2)
    run, abort = rank0_done_training(coord, tmp_path, files=20)
    first = run.token
    # rank 0's worker is lost mid-upload (as the reaper judges it): the attempt is retried on the same gang
    threading.Timer(0.7, coord.rank_failed, args=["J", first, 0, {"type": "WorkerLostError", "message": "lost"}]
                    ).start()
    try:
        with pytest.raises(rankmod.Aborted):
            rankmod.publish_artifacts(coord.settings, coord.state, run, abort, str(tmp_path), store=store)
    finally:
        abort.close()
    assert store.list(coord.settings.artifact_bucket, f"staging/J/{first}/"), "the first attempt staged files"
    job = coord.state.job("J")
    assert job["attempt"] == "2" and job["state"] == JobState.RUNNING.value
    store.seconds = 0.0
    run, abort = rank0_done_training(coord, tmp_path, files=3, first=False)
    try:
        rankmod.publish_artifacts(coord.settings, coord.state, run, abort, str(tmp_path), store=store)
    finally:
        abort.close()
    coord.rank_finished("J", run.token, 0, True)
    published = model_folder(coord, store)
    meta = json.loads(store.get(coord.settings.artifact_bucket, "model/J/metadata.json"))
    assert meta["token"] == run.token != first and meta["attempt"] == 2
    assert published == sorted(f"model/J/{n}" for n in ("metadata.json", "part0.bin", "part1.bin", "part2.bin"))
    # the losing attempt's rank 0, not yet dead, writes one more object after the sweep deleted the rest
    coord.tick()
    store.put(coord.settings.artifact_bucket, f"staging/J/{first}/part19.bin", b"late")
    time.sleep(coord.settings.lease_seconds + coord.settings.kill_grace + 0.3)
    coord.tick()
    assert staged(coord, store) == [] and not coord.state.r.hgetall(keys.STAGED)
    assert model_folder(coord, store) == published


def test_a_coordinator_dying_between_the_success_and_the_copy_leaves_it_to_the_next_tick(coord, tmp_path,
                                                                                       monkeypatch, redis_url):
    coord._store = store = MemoryStore()
    run, abort = rank0_done_training(coord, tmp_path, files=2)
    try:
        rankmod.publish_artifacts(coord.settings, coord.state, run, abort, str(tmp_path), store=store)
    finally:
        abort.close()

    def killed(*_a, **_kw):
        raise Killed("between the success and the copy")
    monkeypatch.setattr(coord.publisher, "publish", killed)
    with pytest.raises(Killed):
        coord.rank_finished("J", run.token, 0, True)
    job = coord.state.job("J")
    assert job["state"] == JobState.SUCCEEDED.value and job["published"] == ""   # readers wait for it
    assert model_folder(coord, store) == []
    restarted = make_coordinator(redis_url)
    restarted._store = store
    try:
        restarted.tick()
    finally:
        restarted.app.close()
    assert coord.state.job("J")["published"] == run.token
    assert len(model_folder(coord, store)) == 3 and staged(coord, store) == []


def test_an_attempt_that_staged_nothing_is_published_by_the_redelivered_report_when_the_first_died(
        coord, tmp_path, monkeypatch):
    """No registration, so no sweep finds it: the coordinator died after the success (placing the next job
    first) and before the publication flag; the report's redelivery (acks_late) publishes."""
    coord._store = MemoryStore()
    run, abort = rank0_done_training(coord, tmp_path, files=0)
    abort.close()
    publish = coord.publisher.publish

    def killed(*_a, **_kw):
        raise Killed("after the placement, before the publication")
    monkeypatch.setattr(coord.publisher, "publish", killed)
    with pytest.raises(Killed):
        coord.rank_finished("J", run.token, 0, True)
    assert coord.state.job("J")["published"] == ""
    coord.tick()   # the sweep has no registration to go by
    assert coord.state.job("J")["published"] == ""
    monkeypatch.setattr(coord.publisher, "publish", publish)
    coord.rank_finished("J", run.token, 0, True)   # redelivered
    assert coord.state.job("J")["published"] == run.token


def test_a_rank_waiting_at_the_barrier_stops_when_its_renewal_is_refused_even_without_the_abort_message(
        coord):
    state = coord.state
    fleet(state, 2)
    coord.submit(spec("J", 2))
    job = state.job("J")
    payload = rank_payload(job, 1, 2)
    run = rankmod.RankRun(coord.settings, state, payload)
    never = rankmod.AbortWatcher(state, "J", "no-such-token")   # the pub/sub abort does not reach this rank
    state.transition("J", (JobState.RUNNING,), JobState.CANCELLED)   # ended without telling the ranks
    started = time.monotonic()
    try:
        with pytest.raises(rankmod.Aborted, match="no longer current"):
            rankmod.barrier(state, run, never, timeout=30.0, publish={})
    finally:
        never.close()
    assert time.monotonic() - started < 5


def test_a_rank_whose_fence_check_raises_leaves_no_abort_listener_behind(coord):
    state = coord.state
    fleet(state, 1)
    coord.submit(spec("J", 1))
    job = state.job("J")
    payload = rank_payload(job, 0, 1)

    def listeners() -> int:
        return sum(isinstance(t, redis.client.PubSubWorkerThread) for t in threading.enumerate())

    before = listeners()
    state.r.delete(keys.job("J"))
    state.r.set(keys.job("J"), "not a hash")   # the fence check's read fails (WRONGTYPE), as a Redis error would
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        rankmod.run_rank(coord.settings, state, coord.app, None, payload)
    deadline = time.monotonic() + 5
    while listeners() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listeners() == before   # its lease, set at reservation, still lets the reaper judge it lost


def test_a_checkpoint_stored_by_a_child_outliving_its_attempt_is_never_recorded_nor_resumed_from(coord):
    state = coord.state
    fleet(state, 2)
    coord.submit(spec("J", 2, max_failures=1))
    first = state.job("J")["token"]
    assert state.record_checkpoint("J", first, 10, f"checkpoints/J/{first}/round-000010.ubj")
    coord.rank_failed("J", first, 1, {"type": "WorkerLostError", "message": "lost"})
    coord.rank_failed("J", first, 0, {"type": "Aborted", "message": "aborted"})
    job = state.job("J")
    assert job["attempt"] == "2" and job["token"] != first
    # the first attempt's rank 0 child, not yet killed, stores round 30 and reports it
    assert not state.record_checkpoint("J", first, 30, f"checkpoints/J/{first}/round-000030.ubj")
    payload = {"job_id": "J", "token": job["token"], "rank": 0, "attempt": 2, "spec": json.loads(job["spec"])}
    assert rankmod._resume(state, payload) == {"resume": (f"checkpoints/J/{first}/round-000010.ubj", 10)}
    assert rankmod._resume(state, {**payload, "rank": 1}) == {}
    torch_payload = {**payload, "rank": 1, "spec": {**payload["spec"], "framework": "pytorch"}}
    assert rankmod._resume(state, torch_payload) == {"checkpoints_recorded": [f"checkpoints/J/{first}/round-000010.ubj"]}


def test_only_the_newest_checkpoints_are_kept_and_all_go_when_the_job_ends(coord):
    from workers.runtime.checkpoints import prune
    assert prune({10: "a", 20: "b", 30: "c"}, 2) == [10] and prune({10: "a"}, 2) == [] and prune({1: "a"}, 0) == []
    state = coord.state
    coord._store = store = MemoryStore()
    store.ensure_bucket(coord.settings.artifact_bucket)
    fleet(state, 1)
    coord.submit(spec("J", 1))
    token = state.job("J")["token"]
    for rounds in (10, 20):
        key = f"checkpoints/J/{token}/round-{rounds:06d}.ubj"
        store.put(coord.settings.artifact_bucket, key, b"booster")
        assert state.record_checkpoint("J", token, rounds, key)
    store.put(coord.settings.artifact_bucket, "checkpoints/J/stale-token/round-000030.ubj", b"stale")
    coord.tick()
    assert len(store.list(coord.settings.artifact_bucket, "checkpoints/J/")) == 3   # running: kept
    coord.cancel("J")
    coord.tick()
    assert store.list(coord.settings.artifact_bucket, "checkpoints/J/") == [] and not state.checkpoints("J")
    assert state.r.sismember(keys.CHECKPOINTED, "J")   # watched a grace longer, for a stale child's late write
    time.sleep(coord.settings.lease_seconds + coord.settings.kill_grace + 0.3)
    coord.tick()
    assert not state.r.sismember(keys.CHECKPOINTED, "J")


def test_a_waiter_hears_its_job_end_and_then_its_artifacts_published_on_the_job_ended_channel(coord, tmp_path):
    run, abort = rank0_done_training(coord, tmp_path, files=1)
    store = staged_by_rank0(coord, run, abort, tmp_path, MemoryStore())
    pubsub = coord.state.r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.JOB_ENDED_CHANNEL)
    assert pubsub.get_message(timeout=1.0) is None   # the subscription is confirmed before the job ends
    coord.rank_finished("J", run.token, 0, True)
    heard = [m["data"] for m in iter(lambda: pubsub.get_message(timeout=1.0), None)]
    pubsub.close()
    assert heard == ["J", "J"]   # the SUCCEEDED transition, then the publication
    assert coord.state.job("J")["published"] == run.token
    assert len(model_folder(coord, store)) == 2 and staged(coord, store) == []


def test_an_abort_watcher_closes_at_once_and_its_thread_ends_with_its_subscription(coord):
    coord.state.r.hset(keys.job("J"), mapping={"state": JobState.RUNNING.value, "token": "t1"})
    watcher = rankmod.AbortWatcher(coord.state, "J", "t1")
    coord.state.r.publish(keys.ABORT_CHANNEL, "J:t1")
    assert watcher.event.wait(5.0) and watcher.reason == "the coordinator aborted the attempt"
    t0 = time.monotonic()
    watcher.close()
    assert time.monotonic() - t0 < 0.05   # the rank's report does not wait for the listener
    watcher._thread.join(2.0)
    assert not watcher._thread.is_alive()


class SlowCopyStore(MemoryStore):
    """The in-memory store, each server-side copy taking ``seconds`` (a loaded S3)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def copy(self, bucket: str, key: str, dst_bucket: str, dst_key: str) -> None:
        time.sleep(self.seconds)
        super().copy(bucket, key, dst_bucket, dst_key)


def test_with_a_publishing_pool_the_report_returns_once_the_next_job_is_placed_and_the_copy_follows(coord, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    run, abort = rank0_done_training(coord, tmp_path, files=2)
    store = staged_by_rank0(coord, run, abort, tmp_path, SlowCopyStore(0.5))
    coord.submit(spec("K", 2))   # waits for J's gang
    coord.publishing = ThreadPoolExecutor(1)
    t0 = time.monotonic()
    coord.rank_finished("J", run.token, 0, True)
    took = time.monotonic() - t0
    job = coord.state.job("J")
    assert took < 0.9 and job["state"] == JobState.SUCCEEDED.value and job["published"] == ""   # inline: >= 1 s
    assert coord.state.job_state("K") is JobState.RUNNING   # placed before J's artifacts were copied
    coord.tick()   # the timer's sweep leaves the publication under way alone
    coord.publishing.shutdown(wait=True)
    assert coord.state.job("J")["published"] == run.token
    assert len(model_folder(coord, store)) == 3 and staged(coord, store) == []


def test_a_ranks_payload_carries_the_coordinators_lease(coord, monkeypatch):
    sent = []
    monkeypatch.setattr(coord.app, "send_task", lambda name, args=(), **kw: sent.append((name, args)))
    fleet(coord.state, 2)
    coord.submit(spec("J", 2))
    payloads = [args[0] for name, args in sent if name == "gangway.train_rank"]
    assert [p["rank"] for p in payloads] == [0, 1]
    assert all(p["lease_seconds"] == coord.settings.lease_seconds == 1.0 for p in payloads)
    assert rankmod.RankRun(coord.settings.replace(lease_seconds=30.0), coord.state, payloads[0]).renew_every \
        == pytest.approx(1 / 3)
