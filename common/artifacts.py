"""A job's artifacts: staged per attempt by rank 0, published by the coordinator once that attempt has won.

Rank 0 writes under a prefix of its own attempt, ``staging/<job_id>/<token>/`` (in the bucket, and under the
stage location, that the job's artifacts go to), metadata.json last, and registers the upload in
``gw:staged`` before its first write. The SUCCEEDED transition (a compare-and-set on the attempt's token)
decides which attempt won; only then does the coordinator copy that attempt's objects into
``model/<job_id>/`` (server-side, metadata.json last), set the job's ``published`` field to the token and
delete the staged objects. Staged uploads of attempts that did not win are deleted by the sweep of every
timer tick, which also publishes for a coordinator that died between the transition and the copy. So what
is under ``model/<job_id>/`` comes from exactly the attempt the job record names, and nothing is there for
a job that did not succeed.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from common import keys
from common.models import JobState
from common.store import ObjectStore, parse_s3_uri

log = logging.getLogger(__name__)

_COPIES = 8   # server-side copies a publication runs at once
MARKER = "metadata.json"   # written last, staged and published: its presence says the set is whole


def _base(spec: dict, artifact_bucket: str) -> tuple[str, str]:
    """(bucket, key prefix) under which a job's artifacts live: a PyTorch job's ``artifact_stage_location``,
    else the root of the artifact bucket."""
    stage = (spec.get("train") or {}).get("artifact_stage_location")
    if stage:
        return parse_s3_uri(stage.rstrip("/") + "/")
    return artifact_bucket, ""


def final_location(spec: dict, job_id: str, artifact_bucket: str) -> tuple[str, str]:
    """(bucket, prefix) of a job's published artifacts: ``{base}model/{job_id}/``."""
    bucket, base = _base(spec, artifact_bucket)
    return bucket, f"{base}model/{job_id}/"


def staging_location(spec: dict, job_id: str, token: str, artifact_bucket: str) -> tuple[str, str]:
    """(bucket, prefix) where rank 0 of attempt ``token`` writes: ``{base}staging/{job_id}/{token}/``."""
    bucket, base = _base(spec, artifact_bucket)
    return bucket, f"{base}staging/{job_id}/{token}/"


@dataclass
class Staged:
    """One attempt's upload, as registered in ``gw:staged``."""

    bucket: str
    prefix: str
    final_bucket: str
    final_prefix: str
    ended_at: float | None = None   # when a sweep first saw its attempt lose (coordinator clock)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> Staged:
        return cls(**json.loads(raw))


def staged_field(job_id: str, token: str) -> str:
    return f"{job_id}:{token}"


def register(r, job_id: str, token: str, staged: Staged) -> None:
    """Rank 0, before its first write: the sweep now knows where this attempt's objects are."""
    r.hset(keys.STAGED, staged_field(job_id, token), staged.to_json())


def _ordered(keys_: list[str], prefix: str) -> list[str]:
    """Relative names, the marker last."""
    names = [k[len(prefix):] for k in keys_]
    return sorted(names, key=lambda n: (n == MARKER, n))


class Publisher:
    """The coordinator's side: publish the winning attempt's staged upload, delete the losers'."""

    def __init__(self, r, store: Callable[[], ObjectStore], grace: float, artifact_bucket: str) -> None:
        self.r = r
        self._store = store
        self.grace = grace   # how long after its attempt lost a stale rank 0 may still write one object
        self.bucket = artifact_bucket
        self._busy: set[tuple[str, str]] = set()   # (job_id, token) being published by a thread of this process
        self._lock = threading.Lock()

    @property
    def store(self) -> ObjectStore:
        return self._store()

    def is_staged(self, job_id: str, token: str) -> bool:
        """Whether attempt ``token`` registered a staged upload (which the timer's sweep publishes)."""
        return bool(self.r.hexists(keys.STAGED, staged_field(job_id, token)))

    def publish(self, job_id: str, token: str) -> bool:
        """Copy attempt ``token``'s staged objects to the job's model folder, if that attempt won; returns
        whether the job's artifacts are now published. Idempotent: a repeat after a crash copies again, and
        two at once copy the same bytes (the staging is listed before the model folder's marker is read, so
        a publisher that saw a staging already being cleaned sees the marker too and deletes nothing)."""
        state, current, published = self.r.hmget(keys.job(job_id), "state", "token", "published")
        if state != JobState.SUCCEEDED.value or current != token:
            return False
        if published:
            return True
        with self._lock:   # the timer's sweep meets a publication this process runs: leave it to that one
            if (job_id, token) in self._busy:
                return False
            self._busy.add((job_id, token))
        try:
            self._publish(job_id, token)
        finally:
            with self._lock:
                self._busy.discard((job_id, token))
        # Last: a coordinator dying at this hint (a Redis command) has left nothing staged behind; one dying
        # between the flag and the registration's removal leaves the registration, which the sweep clears.
        self.r.publish(keys.JOB_ENDED_CHANNEL, job_id)   # wakes a waiter for the artifacts (a hint; it polls too)
        return True

    def _publish(self, job_id: str, token: str) -> None:
        field = staged_field(job_id, token)
        raw = self.r.hget(keys.STAGED, field)
        if raw is None:   # nothing staged by this attempt (or staged, published and cleaned by another pass)
            self.r.hset(keys.job(job_id), "published", token)
            return
        st = Staged.from_json(raw)
        store = self.store
        staged = store.list(st.bucket, st.prefix)
        names = _ordered(staged, st.prefix)
        present = store.list(st.final_bucket, st.final_prefix)   # one listing: a whole publication or a partial one
        winner = self._published_before(store, st, present)
        if winner == token:
            token_published = token   # copied whole by an earlier pass that died before it said so
        elif winner:
            # Only a Redis that lost its last writes (a crash under appendfsync everysec) runs a job again
            # after it was published: the first publication stands, a user may already have read it.
            log.warning("job %s: artifacts of attempt %s were published before; attempt %s's are discarded",
                        job_id, winner, token)
            token_published = winner
        else:
            # a partial copy of another attempt
            store.delete_many(st.final_bucket, [k for k in present if k[len(st.final_prefix):] not in names])
            self._copy(store, st, [n for n in names if n != MARKER])
            self._copy(store, st, [n for n in names if n == MARKER])   # last: its presence says the set is whole
            token_published = token
            log.info("job %s: artifacts of attempt %s published to s3://%s/%s (%d objects)", job_id, token,
                     st.final_bucket, st.final_prefix, len(staged))
        self.r.hset(keys.job(job_id), "published", token_published)
        store.delete_many(st.bucket, staged)
        self.r.hdel(keys.STAGED, field)

    def _copy(self, store: ObjectStore, st: Staged, names: list[str]) -> None:
        """Server-side copies of ``names``, up to _COPIES at once (each waits on the store, not on us)."""
        def one(name: str) -> None:
            store.copy(st.bucket, st.prefix + name, st.final_bucket, st.final_prefix + name)
        if len(names) <= 1:
            for name in names:
                one(name)
            return
        with ThreadPoolExecutor(min(_COPIES, len(names)), thread_name_prefix="gangway-publish") as pool:
            for future in [pool.submit(one, n) for n in names]:
                future.result()   # the first failure raises: the timer's sweep publishes again

    @staticmethod
    def _published_before(store: ObjectStore, st: Staged, present: list[str]) -> str:
        """The token named by a complete publication already in the model folder (``present``: its listing),
        or ''."""
        if st.final_prefix + MARKER not in present:
            return ""
        try:
            return str(json.loads(store.get(st.final_bucket, st.final_prefix + MARKER)).get("token") or "")
        except ValueError:
            return ""

    def sweep(self, now: float) -> None:
        """Publish what a dead coordinator left unpublished; delete staged uploads of attempts that lost.
        A lost attempt's entry stays ``grace`` seconds after its first deletion, so an object its stale rank 0
        still wrote is deleted too."""
        for field, raw in self.r.hgetall(keys.STAGED).items():
            job_id, _, token = field.rpartition(":")
            state, current = self.r.hmget(keys.job(job_id), "state", "token")
            if current == token and state == JobState.RUNNING.value:
                continue   # still uploading
            try:
                if current == token and state == JobState.SUCCEEDED.value:
                    self.publish(job_id, token)
                else:
                    self._discard(field, Staged.from_json(raw), now)
            except Exception as exc:   # the store away: the next tick tries again (one wait per tick, not one each)
                log.warning("job %s: staged artifacts of attempt %s not resolved yet: %s", job_id, token, exc)
                return

    def sweep_checkpoints(self, now: float) -> None:
        """Delete the booster checkpoints of GBDT jobs that ended, whatever the outcome (a succeeded job's
        model is published; a failed one is resubmitted under a new id). A job stays listed ``grace``
        seconds past its end, so an object a stale child still stored goes too."""
        for job_id in self.r.smembers(keys.CHECKPOINTED):
            state, finished = self.r.hmget(keys.job(job_id), "state", "finished_at")
            if state and not JobState(state).is_terminal:
                continue
            try:
                store = self.store
                store.delete_many(self.bucket, store.list(self.bucket, f"checkpoints/{job_id}/"))
            except Exception as exc:   # the store away: the next tick tries again (one wait per tick, not one each)
                log.warning("job %s: checkpoints not deleted yet: %s", job_id, exc)
                return
            self.r.delete(keys.job_checkpoints(job_id))
            if not state or now - float(finished or 0) > self.grace:
                self.r.srem(keys.CHECKPOINTED, job_id)

    def sweep_orphans(self) -> bool:
        """Delete staged objects of the artifact bucket that no registration names (a Redis that lost its
        last writes lost the registration), unless their attempt runs or won (its registration is made
        again). Objects are listed before the registrations are read: a listed object's registration, if it
        has one, is already there. Returns whether the listing could be made."""
        try:
            found = self.store.list(self.bucket, "staging/")
        except Exception as exc:
            log.warning("staged artifacts not swept: %s", exc)
            return False
        if not found:
            return True
        entries = self.r.hkeys(keys.STAGED)
        for key in found:
            job_id, token = key.split("/")[1:3]
            if staged_field(job_id, token) in entries:
                continue
            state, current = self.r.hmget(keys.job(job_id), "state", "token")
            if current == token and state in (JobState.RUNNING.value, JobState.SUCCEEDED.value):
                spec = {"train": {}}
                register(self.r, job_id, token, Staged(self.bucket, f"staging/{job_id}/{token}/",
                                                       *final_location(spec, job_id, self.bucket)))
                entries.append(staged_field(job_id, token))
            else:
                self.store.delete(self.bucket, key)
        return True

    def _discard(self, field: str, st: Staged, now: float) -> None:
        store = self.store
        store.delete_many(st.bucket, store.list(st.bucket, st.prefix))
        if st.ended_at is None:
            st.ended_at = now
            self.r.hset(keys.STAGED, field, st.to_json())
            log.info("staged artifacts %s of an attempt that did not succeed deleted", field)
        elif now - st.ended_at > self.grace:
            self.r.hdel(keys.STAGED, field)
