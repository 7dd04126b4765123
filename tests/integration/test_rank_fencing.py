"""A rank's long, quiet phases against the real coordinator on a real Redis: rank 0's artifact upload keeps
its lease and stops once its attempt ends; a rank at the barrier notices a refused renewal."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from common.models import JobState, RankState
from common.store import MemoryStore
from tests.integration.coordination import coord, fleet, spec  # noqa: F401 (coord is a fixture)
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


def rank0_done_training(coord, tmp_path, files: int):
    """Job J on two workers; rank 1 has succeeded and rank 0's child left ``files`` model files."""
    state = coord.state
    fleet(state, 2)
    coord.submit(spec("J", 2, max_failures=1))
    job = state.job("J")
    payload = {"job_id": "J", "token": job["token"], "rank": 0, "worker_id": "w0", "attempt": 1,
               "rendezvous": {"world_size": 2}, "spec": json.loads(job["spec"])}
    run = rankmod.RankRun(coord.settings, state, payload)
    run.write(RankState.TRAINING)
    coord.rank_finished("J", job["token"], 1, True)
    for i in range(files):
        (tmp_path / f"part{i}.bin").write_bytes(os.urandom(64))
    return run, rankmod.AbortWatcher(state, "J", job["token"])


def test_an_artifact_upload_longer_than_the_lease_keeps_the_attempt_and_writes_once(coord, tmp_path, monkeypatch):
    monkeypatch.setattr(rankmod, "_RENEW_EVERY", 0.3)
    run, abort = rank0_done_training(coord, tmp_path, files=6)
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
    meta = json.loads(store.get(coord.settings.artifact_bucket, "model/J/metadata.json"))
    assert uri.endswith("/model/J/") and meta["token"] == job["token"] and len(meta["files"]) == 6


def test_an_upload_stops_at_the_next_object_once_its_attempt_has_ended(coord, tmp_path, monkeypatch):
    monkeypatch.setattr(rankmod, "_RENEW_EVERY", 0.3)
    run, abort = rank0_done_training(coord, tmp_path, files=20)
    store = SlowStore(0.2)
    threading.Timer(0.5, coord.cancel, args=["J"]).start()   # cancelled while rank 0 uploads
    try:
        with pytest.raises(rankmod.Aborted, match="while its artifacts were being written"):
            rankmod.publish_artifacts(coord.settings, coord.state, run, abort, str(tmp_path), store=store)
    finally:
        abort.close()
    written = store.list(coord.settings.artifact_bucket, "model/J/")
    assert coord.state.job_state("J") is JobState.CANCELLED
    assert len(written) < 20 and "model/J/metadata.json" not in written


def test_a_rank_waiting_at_the_barrier_stops_when_its_renewal_is_refused_even_without_the_abort_message(
        coord, monkeypatch):
    monkeypatch.setattr(rankmod, "_RENEW_EVERY", 0.3)
    state = coord.state
    fleet(state, 2)
    coord.submit(spec("J", 2))
    job = state.job("J")
    payload = {"job_id": "J", "token": job["token"], "rank": 1, "worker_id": "w1", "attempt": 1,
               "rendezvous": {"world_size": 2}, "spec": json.loads(job["spec"])}
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
