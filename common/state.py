"""Coordination state in Redis: jobs, ranks, logs and the worker registry.

Both sides use this module: the producer reads, the coordinator and the ranks
write through compare-and-set scripts (``transition.lua``, ``fenced.lua``) so a
stale attempt can never overwrite a newer one.
"""
from __future__ import annotations

import functools
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import redis

from common import keys
from common.models import ALLOWED_TRANSITIONS, JobSpec, JobState, WorkerInfo, WorkerView
from common.settings import Settings

log = logging.getLogger(__name__)
_LUA_DIR = Path(__file__).parent


def connect(settings: Settings, *, ride_out: bool = False) -> redis.Redis:
    """A client for the coordination store (the broker's Redis); ``rediss://`` works.

    ``ride_out`` (the fleet's long-lived processes) retries a command through a Redis that does not
    answer for up to GANGWAY_REDIS_OUTAGE_SECONDS (a restart on its AOF takes a second or two), so a
    training rank does not fail on a broker restart; callers at the door fail fast instead."""
    # Every call has a deadline: a peer lost to a partition must not hold a supervisor for TCP's ~15 min.
    opts: dict = {"socket_timeout": settings.redis_socket_timeout, "socket_keepalive": True}
    if ride_out:
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry
        # 0.05, 0.1 … 1 s: about one second per retry once the backoff is capped
        retries = 5 + int(settings.redis_outage_seconds)
        opts.update(retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
                    retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    return redis.Redis.from_url(settings.broker_url, decode_responses=True,
                                socket_connect_timeout=5, health_check_interval=30, **opts)


def _script(client: redis.Redis, name: str, folder: Path = _LUA_DIR):
    return client.register_script((folder / name).read_text())


class State:
    """Typed access to the coordination keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._transition = _script(client, "transition.lua")
        self._fenced = _script(client, "fenced.lua")
        self._checkpoint = _script(client, "checkpoint.lua")
        self._free = _script(client, "free.lua")

    # jobs -----------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, str] | None:
        data = self.r.hgetall(keys.job(job_id))
        return data or None

    def job_state(self, job_id: str) -> JobState | None:
        s = self.r.hget(keys.job(job_id), "state")
        return JobState(s) if s else None

    def spec(self, job_id: str) -> JobSpec | None:
        raw = self.r.hget(keys.job(job_id), "spec")
        return JobSpec.from_json(raw) if raw else None

    def ranks(self, job_id: str) -> dict[int, dict[str, Any]]:
        return {int(k): json.loads(v) for k, v in self.r.hgetall(keys.job_ranks(job_id)).items()}

    def log(self, job_id: str, start: int = 0) -> list[str]:
        return self.r.lrange(keys.job_log(job_id), start, -1)

    def list_jobs(self, limit: int = 50) -> list[dict[str, str]]:
        ids = self.r.zrevrange(keys.JOBS, 0, limit - 1)
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.hmget(keys.job(job_id), "state", "framework", "attempt", "submitted_at", "error", "priority")
        out = []
        for job_id, vals in zip(ids, pipe.execute()):
            state, fw, attempt, submitted, error, prio = vals
            out.append({"job_id": job_id, "state": state or "?", "framework": fw or "", "attempt": attempt or "0",
                        "submitted_at": submitted or "", "error": error or "", "priority": prio or "0"})
        return out

    def transition(self, job_id: str, allowed_from: Iterable[JobState], to: JobState,
                   token: str = "", *, expire_after: float | None = None, **fields: Any) -> JobState | None:
        """Move the job to ``to`` if it is in ``allowed_from`` (and at ``token``); returns the old state.

        One atomic step (``transition.lua``): leaving RUNNING also frees the workers the ending attempt
        holds and removes the job from the running set; reaching a terminal state with ``expire_after``
        seconds sets the job's keys to expire."""
        allowed_from = tuple(allowed_from)
        illegal = [s.value for s in allowed_from if to not in ALLOWED_TRANSITIONS[s]]
        if illegal:   # a caller asking for a move the state machine does not have is a bug
            raise ValueError(f"no transition {illegal} -> {to.value} in models.ALLOWED_TRANSITIONS")
        args: list[Any] = [",".join(s.value for s in allowed_from), to.value, token, keys.worker(""),
                           str(int(expire_after)) if expire_after else ""]
        for k, v in fields.items():
            args += [k, v if isinstance(v, str) else json.dumps(v)]
        prev = self._transition(keys=[keys.job(job_id), keys.PENDING, keys.RUNNING, keys.FREE,
                                      keys.job_ranks(job_id), keys.job_log(job_id), keys.job_checkpoints(job_id)],
                                args=args)
        if prev and to.is_terminal:
            self.announce_ended(job_id)
        return JobState(prev) if prev else None

    def announce_ended(self, job_id: str) -> None:
        """Wake whoever waits on the job (``TrainingJob.wait``): a hint only, waiters still poll, so a
        publish that fails or is missed costs them latency, never the outcome."""
        try:
            self.r.publish(keys.JOB_ENDED_CHANNEL, job_id)
        except Exception as exc:
            log.warning("job %s: end not announced on %s: %s", job_id, keys.JOB_ENDED_CHANNEL, exc)

    def fenced_write(self, job_id: str, token: str, rank: int, status: dict | None = None,
                     lines: Iterable[str] = ()) -> bool:
        """Write rank status and/or log lines if ``token`` is still the job's current one; every accepted
        write renews the rank's lease (a key with a Redis-side TTL, so no two hosts' clocks are compared)."""
        args = [token, str(rank), json.dumps(status) if status else "", *lines]
        return bool(self._fenced(keys=[keys.job(job_id), keys.job_ranks(job_id), keys.job_log(job_id),
                                       keys.rank_lease(job_id, token, rank)], args=args))

    def record_checkpoint(self, job_id: str, token: str, rounds: int, key: str, *, sweep: bool = True) -> bool:
        """Record a stored checkpoint as one a retry may resume from, if ``token`` is still current. With
        ``sweep`` (GBDT boosters) the coordinator deletes the job's checkpoints once it ended; PyTorch
        checkpoints are the user's (``get_checkpoint_location()``) and stay."""
        pipe = self.r.pipeline()
        if sweep:
            pipe.sadd(keys.CHECKPOINTED, job_id)   # before the record: the sweep deletes what an ended job left
        self._checkpoint(keys=[keys.job(job_id), keys.job_checkpoints(job_id)], args=[token, rounds, key],
                         client=pipe)
        return bool(pipe.execute()[-1])

    def checkpoints(self, job_id: str) -> dict[int, str]:
        """rounds -> object key of the job's recorded checkpoints."""
        return {int(k): v for k, v in self.r.hgetall(keys.job_checkpoints(job_id)).items()}

    def forget_checkpoints(self, job_id: str, rounds: list[int]) -> None:
        if rounds:
            self.r.hdel(keys.job_checkpoints(job_id), *rounds)

    def rank_lease_alive(self, job_id: str, token: str, rank: int) -> bool:
        return bool(self.r.exists(keys.rank_lease(job_id, token, rank)))

    # workers --------------------------------------------------------------
    def workers(self, ids: Iterable[str] | None = None) -> list[WorkerView]:
        """Views of the registered workers (or of ``ids`` among them): two commands per worker."""
        ids = sorted(self.r.smembers(keys.WORKERS) if ids is None else ids)
        if not ids:
            return []
        pipe = self.r.pipeline()
        for wid in ids:
            pipe.hmget(keys.worker(wid), "info", "job", "draining")
            pipe.exists(keys.worker_alive(wid))
        res = pipe.execute()
        out = []
        for i, _ in enumerate(ids):
            (info, job, draining), alive = res[2 * i], res[2 * i + 1]
            if info:
                out.append(WorkerView(_worker_info(info), bool(alive), job or "", draining == "1"))
        return out

    def registry(self) -> tuple[str, dict[str, WorkerInfo]]:
        """(epoch, worker id -> registration) of every registered worker; the epoch changes whenever a
        registration is added or removed, so a reader may keep this until it does."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(keys.REGISTRY_EPOCH)
        pipe.smembers(keys.WORKERS)
        epoch, ids = pipe.execute()
        ids = sorted(ids)
        pipe = self.r.pipeline(transaction=False)
        for wid in ids:
            pipe.hget(keys.worker(wid), "info")
        return epoch or "", {wid: _worker_info(raw) for wid, raw in zip(ids, pipe.execute()) if raw}

    def sync_free(self, worker_ids: Iterable[str], client=None) -> None:
        """Bring the free-worker index in line with these workers' hashes (after a direct write to one)."""
        pipe = client if client is not None else self.r.pipeline(transaction=False)
        for wid in worker_ids:
            self._free(keys=[keys.worker(wid), keys.FREE, keys.worker_alive(wid)], args=[wid, ""], client=pipe)
        if client is None:
            pipe.execute()

    def register_worker(self, info: WorkerInfo, ttl: float, *, draining: bool = False) -> None:
        pipe = self.r.pipeline()
        pipe.sadd(keys.WORKERS, info.worker_id)
        pipe.hset(keys.worker(info.worker_id), mapping={"info": info.to_json(), "draining": "1" if draining else "0"})
        pipe.hdel(keys.worker(info.worker_id), "dead_since")
        pipe.hsetnx(keys.worker(info.worker_id), "job", "")
        pipe.persist(keys.worker(info.worker_id))   # a worker back under a deregistered id keeps its hash
        pipe.set(keys.worker_alive(info.worker_id), str(time.time()), px=int(ttl * 1000))
        pipe.set(keys.REGISTRY_EPOCH, secrets.token_hex(8))
        self.sync_free([info.worker_id], client=pipe)
        pipe.execute()

    def heartbeat(self, worker_id: str, ttl: float) -> None:
        """Renew the worker's alive key; a worker back from a gap re-enters the free-worker index."""
        self._free(keys=[keys.worker(worker_id), keys.FREE, keys.worker_alive(worker_id)],
                   args=[worker_id, max(1, int(ttl * 1000)), str(time.time())])

    def set_draining(self, worker_id: str) -> None:
        """Take no new gang: out of the free-worker index in the same step."""
        pipe = self.r.pipeline()
        pipe.hset(keys.worker(worker_id), "draining", "1")
        self.sync_free([worker_id], client=pipe)
        pipe.execute()

    def deregister_worker(self, worker_id: str, keep_seconds: float = 86400) -> None:
        """Leave the registry. The worker's hash stays ``keep_seconds`` (a reaper may still read what job it
        held), then goes: ids are new on every start, so a hash without a TTL would pile up."""
        pipe = self.r.pipeline()
        pipe.delete(keys.worker_alive(worker_id))
        pipe.srem(keys.WORKERS, worker_id)
        pipe.srem(keys.FREE, worker_id)
        pipe.hdel(keys.worker(worker_id), "info")
        pipe.expire(keys.worker(worker_id), max(1, int(keep_seconds)))
        pipe.set(keys.REGISTRY_EPOCH, secrets.token_hex(8))
        pipe.execute()

    def prune_dead_workers(self, views, older_than: float) -> list[str]:
        """Drop registrations dead (and holding no job) for ``older_than`` seconds; returns their ids."""
        now, dropped = time.time(), []
        revived = [w.info.worker_id for w in views if w.alive]
        if revived:   # a worker back from a heartbeat gap starts its next one with a clean slate
            pipe = self.r.pipeline()
            for wid in revived:
                pipe.hdel(keys.worker(wid), "dead_since")
            pipe.execute()
        for w in views:
            if w.alive or w.job_id:
                continue
            key = keys.worker(w.info.worker_id)
            self.r.hsetnx(key, "dead_since", now)
            if now - float(self.r.hget(key, "dead_since") or now) > older_than:
                pipe = self.r.pipeline()
                pipe.srem(keys.WORKERS, w.info.worker_id)
                pipe.srem(keys.FREE, w.info.worker_id)
                pipe.delete(key)
                pipe.set(keys.REGISTRY_EPOCH, secrets.token_hex(8))
                pipe.execute()
                dropped.append(w.info.worker_id)
        return dropped

    def coordinator_alive(self) -> bool:
        return bool(self.r.exists(keys.COORDINATOR_ALIVE))


@functools.lru_cache(maxsize=16384)
def _worker_info(raw: str) -> WorkerInfo:
    """A registration's info, parsed once: it changes only when the worker registers again."""
    return WorkerInfo.from_json(raw)
