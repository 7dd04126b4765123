"""The coordinator: persists jobs, runs scheduling passes, finishes and aborts attempts.

Celery tasks (``tasks.py``) decode their arguments and call one method here;
decisions come from the pure functions in ``scheduler.py``.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import Executor

import redis
from celery import Celery

from common import keys, metrics
from common.artifacts import Publisher
from common.models import JobSpec, JobState, RankState, Resources, WorkerInfo, WorkerView
from common.settings import Settings
from common.signing import SecurityError, verify
from common.state import State
from common.store import ObjectStore, S3Store
from workers.coordinator.policy import FailureAction, decide, headline, is_retryable, root_cause
from workers.coordinator.reservation import Reservations
from workers.coordinator.scheduler import (
    Action,
    Fleet,
    compute_rendezvous,
    infeasibility,
    pending_score,
    plan_fleet,
)

log = logging.getLogger(__name__)

FRAMEWORKS = ("xgboost", "lightgbm", "pytorch")
_JOB_ID = re.compile(r"(?!\.)[A-Za-z0-9._-]{1,128}")
_ACTIVE = (JobState.SUBMITTED, JobState.PENDING, JobState.RUNNING)
_SPEC_BATCH = 8   # pending specs read per round trip while a pass plans
_SWEEP = 64   # registered workers the reaper checks per tick (prune, repair, free index)
_STALE_PICKS = 8   # plans per pass when picks meet stale free-index entries (each drops at least one)


@functools.lru_cache(maxsize=4096)
def _spec(raw: str) -> JobSpec:
    """A pending job's spec, parsed once: a blocked queue's head is read again on every pass."""
    return JobSpec.from_json(raw)


def spec_problems(spec: JobSpec) -> list[str]:
    """Structural problems of a job spec (data-level checks happen at the caller)."""
    problems = []
    if not _JOB_ID.fullmatch(spec.job_id or ""):   # it names keys, folders and S3 prefixes
        problems.append(f"job_id {spec.job_id!r} must be 1-128 characters of letters, digits, '.', '_', '-'")
    if spec.framework not in FRAMEWORKS:
        problems.append(f"unknown framework {spec.framework!r} (expected one of {list(FRAMEWORKS)})")
    n = spec.resources.num_workers
    if not isinstance(n, int) or n == 0 or n < -1:
        problems.append(f"num_workers must be -1 (every free worker) or >= 1, got {n!r}")
    if spec.framework != "pytorch" and not spec.datasets.get("train", {}).get("uri"):
        problems.append("the job has no 'train' dataset")
    if spec.framework == "pytorch" and not spec.train.get("func_uri"):
        problems.append("the job has no train_func")
    return problems


class Coordinator:
    def __init__(self, settings: Settings, state: State, app: Celery, store: ObjectStore | None = None) -> None:
        self.settings = settings
        self.state = state
        self.r = state.r
        self.reservations = Reservations(state.r)
        self.app = app
        self._store = store
        # a stale rank 0 writes at most one more object once a renewal is refused (one renewal period)
        self.publisher = Publisher(state.r, lambda: self.store, settings.lease_seconds + settings.kill_grace,
                                   settings.artifact_bucket)
        # Set by the coordinator process (workers/coordinator/main.py): rank_finished returns once the next job
        # is placed and publishes there; None (tests, tools): rank_finished publishes before it returns.
        self.publishing: Executor | None = None
        self.advertise: dict = {}   # what tick() keeps in COORDINATOR_INFO (metrics URL), across Redis restarts
        self._registry: tuple[str | None, dict[str, WorkerInfo]] = (None, {})   # (epoch, registrations)
        self._registered: list[WorkerView] = []
        self._never_fits_cache: dict[Resources, str] = {}
        self._sweep_at = 0   # where the reaper's sweep over the registry goes on

    @property
    def store(self) -> ObjectStore:
        """The artifact store (built on first use: a coordinator that never publishes needs no S3)."""
        if self._store is None:
            self._store = S3Store(self.settings)
        return self._store

    # clocks ---------------------------------------------------------------
    def now(self) -> float:
        """Redis' clock: every timestamp the coordinator persists and compares, whichever host it runs on."""
        sec, usec = self.r.time()
        return sec + usec / 1e6

    def redis_uptime(self) -> float:
        """Seconds since the Redis server started: liveness keys (TTL) mean nothing before a full TTL of it."""
        try:
            return float(self.r.info("server").get("uptime_in_seconds", 0))
        except redis.ResponseError:   # a managed Redis that refuses INFO: judge liveness as before
            return float("inf")

    @property
    def never_fits_grace(self) -> float:
        """How long a first attempt must look unplaceable on the registered fleet before it fails (a
        worker restarting deregisters and registers again within a few heartbeats)."""
        return 3 * self.settings.heartbeat_ttl

    # submission ----------------------------------------------------------
    def submit(self, spec: JobSpec) -> JobState:
        """Validate and persist ``spec`` as PENDING (idempotent), then run a scheduling pass."""
        key = keys.job(spec.job_id)
        if self.r.hexists(key, "spec") or self.r.hget(key, "state") == JobState.CANCELLED.value:
            return JobState(self.r.hget(key, "state"))   # redelivered, or cancelled before it was persisted
        seq = self.r.incr(keys.SEQ)
        now = self.now()
        pipe = self.r.pipeline(transaction=True)   # the whole record or nothing, if we die here
        pipe.hset(key, mapping={"state": JobState.PENDING.value, "spec": spec.to_json(),
                                "framework": spec.framework, "attempt": 0, "token": "",
                                "priority": spec.priority, "submitted_at": spec.submitted_at,
                                "timeout": spec.timeout, "persisted_at": now, "accepted_at": now})
        pipe.zadd(keys.JOBS, {spec.job_id: spec.submitted_at or now})
        pipe.zadd(keys.PENDING, {spec.job_id: pending_score(spec.priority, seq)})
        pipe.hset(key, "score", pending_score(spec.priority, seq))
        if spec.timeout > 0:   # indexed: the timer reads only what is due, not every job
            pipe.zadd(keys.DEADLINES, {spec.job_id: now + spec.timeout})
        pipe.execute()
        try:
            verify(self.settings.secret, json.loads(spec.to_json()))
        except SecurityError as exc:
            log.error("SECURITY job %s refused at submit: %s", spec.job_id, exc)
            metrics.JOBS_REJECTED.labels("security").inc()
            self.fail(spec.job_id, str(exc), kind="SecurityError")
            return JobState.FAILED
        problems = spec_problems(spec)
        if problems:
            metrics.JOBS_REJECTED.labels("invalid").inc()
            self.fail(spec.job_id, "invalid job: " + "; ".join(problems), kind="ValidationError")
            return JobState.FAILED
        log.info("job %s persisted (%s, priority %s)", spec.job_id, spec.framework, spec.priority)
        metrics.JOBS_SUBMITTED.labels(spec.framework).inc()
        self.schedule_pass()
        return self.state.job_state(spec.job_id) or JobState.PENDING

    # scheduling ----------------------------------------------------------
    def schedule_pass(self) -> int:
        """One pass: place what fits, fail what never can. Returns the number of jobs placed."""
        mine = uuid.uuid4().hex
        if not self.r.set(keys.SCHEDULE_LOCK, mine, nx=True, px=5000):
            return 0
        try:
            with metrics.SCHEDULING_PASS.time():
                return self._pass()
        finally:
            if self.r.get(keys.SCHEDULE_LOCK) == mine:   # never delete a later pass's lock
                self.r.delete(keys.SCHEDULE_LOCK)

    def _pass(self) -> int:
        """Place what fits, reading the queue's head and the free-worker index, not every worker. A pick
        that meets a stale index entry (a worker dead, draining or taken since it was indexed) loses its
        reservation, the script drops the entry, and the pass plans again."""
        placed = 0
        for _ in range(_STALE_PICKS):
            n, stale = self._plan_and_place()
            placed += n
            if not stale:
                break
        return placed

    def _plan_and_place(self) -> tuple[int, bool]:
        """One plan over the queue's head, executed; returns (jobs placed, whether a pick was stale)."""
        pipe = self.r.pipeline(transaction=True)   # one round trip: the queue's head, the fleet, the clock
        pipe.zrange(keys.PENDING, 0, 99)
        pipe.get(keys.REGISTRY_EPOCH)
        pipe.smembers(keys.FREE)
        pipe.smembers(keys.RUNNING)
        pipe.time()
        ids, epoch, free, running, (sec, usec) = pipe.execute()
        if not ids:
            return 0, False
        now = sec + usec / 1e6
        specs: dict[str, JobSpec] = {}
        fleet = self._fleet(epoch or "", free, running)
        by_id = {w.info.worker_id: w for w in fleet.registered}
        placed = 0
        for decision in plan_fleet(self._head_specs(ids, specs), fleet, self._never_fits):
            if decision.action is Action.FAIL and int(self.r.hget(keys.job(decision.job_id), "attempt") or 0):
                # A retry whose fleet shrank (a worker died or drains) waits, bounded by the placement deadline.
                self._note_waiting(decision.job_id, decision.reason, now)
            elif decision.action is Action.FAIL:
                self._fail_if_never_fits(decision.job_id, decision.reason, now)
            elif decision.action is Action.WAIT:
                if self.reservations.drop_dead_free():   # the reason counts live free workers only: plan again
                    return placed, True
                self._note_waiting(decision.job_id, decision.reason, now, fits=True)
            else:
                self.r.hdel(keys.job(decision.job_id), "never_fits_since")
                outcome = self._place(decision.placement, by_id, specs[decision.job_id])
                if outcome == "placed":
                    placed += 1
                elif outcome == "gone":
                    self.r.zrem(keys.PENDING, decision.job_id)   # cancelled meanwhile: never block the queue
                else:
                    return placed, outcome == "stale"
        return placed, False

    def _head_specs(self, ids: list[str], into: dict[str, JobSpec]) -> Iterator[JobSpec]:
        """The specs of the queue's head, read a few per round trip as the plan asks for them: a pass
        blocked by its first job reads one batch, not the whole head."""
        for at in range(0, len(ids), _SPEC_BATCH):
            pipe = self.r.pipeline(transaction=False)
            for job_id in ids[at:at + _SPEC_BATCH]:
                pipe.hget(keys.job(job_id), "spec")
            for raw in pipe.execute():
                if raw:
                    spec = _spec(raw)
                    into[spec.job_id] = spec
                    yield spec

    def _fleet(self, epoch: str, free: set[str], running: set[str]) -> Fleet:
        """The fleet from the free-worker index and the jobs holding gangs, with the registrations kept
        until the registry's epoch changes."""
        if epoch != self._registry[0] or not free <= self._registry[1].keys():
            self._registry = self.state.registry()
            self._registered = [WorkerView(info, True) for info in self._registry[1].values()]
            self._never_fits_cache = {}
            unregistered = free - self._registry[1].keys()
            if unregistered:   # an entry with no registration behind it: the script takes it out
                self.state.sync_free(unregistered)
        infos = self._registry[1]
        return Fleet(registered=self._registered,
                     free=[WorkerView(infos[w], True) for w in sorted(free) if w in infos],
                     holders=tuple(running))

    def _never_fits(self, resources: Resources) -> str:
        """``infeasibility`` over the registered fleet, remembered per request until the registry changes."""
        if resources not in self._never_fits_cache:
            self._never_fits_cache[resources] = infeasibility(resources, self._registered, registered=True)
        return self._never_fits_cache[resources]

    def _fail_if_never_fits(self, job_id: str, reason: str, now: float) -> None:
        """Fail a first attempt the registered fleet cannot hold once it has looked so for the grace."""
        key = keys.job(job_id)
        self.r.hsetnx(key, "never_fits_since", now)
        since = float(self.r.hget(key, "never_fits_since") or now)
        if now - since < self.never_fits_grace:
            self.r.hset(key, "waiting", f"{reason} (failing in {self.never_fits_grace - (now - since):.0f}s "
                                        "unless the fleet grows)")
            return
        self.fail(job_id, f"the gang can never be placed: {reason}", kind="PlacementError",
                  allowed_from=(JobState.PENDING,))

    def _note_waiting(self, job_id: str, reason: str, now: float, *, fits: bool = False) -> None:
        pipe = self.r.pipeline(transaction=False)   # one round trip: a blocked queue pays this on every pass
        if fits:
            pipe.hdel(keys.job(job_id), "never_fits_since")
        pipe.hset(keys.job(job_id), "waiting", reason)
        pipe.hget(keys.job(job_id), "persisted_at")
        persisted = float(pipe.execute()[-1] or now)
        if now - persisted > self.settings.placement_timeout:
            self.fail(job_id, f"placement deadline of {self.settings.placement_timeout:.0f}s passed: {reason} "
                              f"(raise GANGWAY_PLACEMENT_TIMEOUT or add workers)",
                      kind="PlacementError", allowed_from=(JobState.PENDING,))

    def _place(self, placement, by_id: dict[str, WorkerView], spec: JobSpec) -> str:
        gang = [by_id[w] for w in placement.worker_ids]
        rdv = compute_rendezvous(gang)
        now = self.now()
        token, reason = self.reservations.reserve(
            placement, rdv, self.settings.lease_seconds, now=now,
            first_lease_seconds=self.settings.rendezvous_timeout + self.settings.lease_seconds)
        if not token:
            log.info("job %s: reservation lost a race (%s)", placement.job_id, reason)
            if reason == "job not pending":
                return "gone"
            return "stale" if reason.split(":", 1)[0] in ("dead", "draining", "busy") else "raced"
        attempt_raw, persisted = self.r.hmget(keys.job(placement.job_id), "attempt", "persisted_at")
        attempt = int(attempt_raw or 1)
        metrics.GANG_WAIT.labels(spec.framework).observe(max(0.0, now - float(persisted or now)))
        log.info("job %s attempt %s: gang %s reserved (token %s)", placement.job_id, attempt,
                 list(placement.worker_ids), token)
        common = {"job_id": placement.job_id, "token": token, "attempt": attempt, "use_gpu": placement.use_gpu,
                  "rendezvous": rdv.to_dict(), "spec": json.loads(spec.to_json()),
                  "lease_seconds": self.settings.lease_seconds}   # built once per gang; the lease reserve.lua set
        for rank, wid in enumerate(placement.worker_ids):
            host = by_id[wid].info.host
            host_gpus = [g for w in gang if w.info.host == host for g in w.info.gpus[:1]]
            own = list(by_id[wid].info.gpus[:max(1, spec.resources.gpus_per_worker)]) if placement.use_gpu else []
            payload = {**common, "rank": rank, "worker_id": wid, "host_gpus": host_gpus, "gpus": own}
            self.app.send_task("gangway.train_rank", args=[payload], queue=keys.worker_queue(wid),
                               task_id=f"{placement.job_id}.{token}.r{rank}",
                               # what Flower shows instead of the payload (which carries the whole spec)
                               argsrepr=f"job_id={placement.job_id} attempt={attempt} rank={rank} worker={wid}")
        return "placed"

    # endings -------------------------------------------------------------
    def rank_finished(self, job_id: str, token: str, rank: int, ok: bool,
                      error: dict | None = None, summary: dict | None = None) -> None:
        job = self.state.job(job_id)
        if not job or job.get("token") != token:
            log.info("job %s: ignoring report of stale attempt %s rank %s", job_id, token, rank)
            return
        if summary:
            self.r.hset(keys.job(job_id), f"rank{rank}_summary", json.dumps(summary))
        if not ok:
            self.rank_failed(job_id, token, rank, error or {"type": "Error", "message": "no error reported"})
            return
        done_key = keys.job_done(job_id, token)
        self.r.sadd(done_key, rank)
        self.r.expire(done_key, 86400)
        world = len(json.loads(job.get("gang") or "{}").get("workers", []))
        if self.r.scard(done_key) >= world:
            # The compare-and-set decides which attempt won; 'published' (empty until the winner's staged
            # artifacts are copied to the model folder) tells readers to wait for them.
            prev = self.state.transition(job_id, (JobState.RUNNING,), JobState.SUCCEEDED, token=token,
                                         expire_after=self._job_ttl, finished_at=str(self.now()), published="")
            if prev:
                log.info("job %s succeeded", job_id)
                metrics.JOBS_FINISHED.labels(job.get("framework", "unknown"), "succeeded").inc()
                # The transition freed the gang: place the next job first, then copy this one's artifacts
                # (a few store round trips, 20-200 ms), which kept a freed worker idle when done the other
                # way round, and off the task loop where there is a pool for it, so the next report is not
                # queued behind them (what a coordinator that dies leaves unpublished, the timer's sweep publishes).
                self._end_attempt(job_id, token, abort=False)
                if self.publishing is not None and self.publisher.is_staged(job_id, token):
                    self.publishing.submit(self.publish, job_id, token)   # registered: the sweep covers a death
                else:
                    self.publish(job_id, token)   # nothing staged: one flag, set before this task is acknowledged
            else:
                # A redelivered report of the attempt that won: the delivery that made the transition may have
                # died before it published, and an attempt that staged nothing has no registration for the
                # timer's sweep to find. A no-op unless the job succeeded under this token and is unpublished.
                self.publish(job_id, token)

    def publish(self, job_id: str, token: str) -> None:
        """Publish the winning attempt's artifacts; a store that fails now leaves it to the timer's sweep."""
        try:
            self.publisher.publish(job_id, token)
        except Exception as exc:
            log.warning("job %s: publishing the artifacts of attempt %s failed (the timer retries): %s",
                        job_id, token, exc)

    # failures ------------------------------------------------------------
    def _errors_key(self, job_id: str, token: str) -> str:
        return f"{keys.job(job_id)}:errors:{token}"

    def rank_failed(self, job_id: str, token: str, rank: int, error: dict) -> None:
        """Record a rank's error and abort the attempt; decide once every rank has reported (or the
        grace period ends), so the root cause wins over its echoes (peers' socket errors)."""
        if self.r.sismember(keys.job_done(job_id, token), rank):
            return   # it finished; a later loss of its worker changes nothing
        ekey = self._errors_key(job_id, token)
        pipe = self.r.pipeline()
        if error.get("type") == "Aborted":   # an echo never overwrites the cause reported for this rank
            pipe.hsetnx(ekey, str(rank), json.dumps(error))
        else:
            pipe.hset(ekey, str(rank), json.dumps(error))
        pipe.expire(ekey, 86400)
        pipe.hset(keys.job(job_id), f"rank{rank}_error", json.dumps(error))
        pipe.hsetnx(keys.job(job_id), f"failing:{token}", self.now())
        pipe.hget(keys.job(job_id), "framework")
        res = pipe.execute()
        if res[0]:   # a rank counts once per attempt, by its first report (a later echo or a replay does not)
            metrics.RANK_FAILURES.labels(res[-1] or "unknown", metrics.failure_reason(error.get("type", ""))).inc()
        self.r.publish(keys.ABORT_CHANNEL, f"{job_id}:{token}")
        job = self.state.job(job_id) or {}
        world = len(json.loads(job.get("gang") or "{}").get("workers", []))
        reported = self.r.hlen(ekey) + self.r.scard(keys.job_done(job_id, token))
        if reported >= world:
            self.decide_attempt(job_id, token)

    def decide_attempt(self, job_id: str, token: str) -> None:
        errors = {int(k): json.loads(v) for k, v in self.r.hgetall(self._errors_key(job_id, token)).items()}
        real = {r: e for r, e in errors.items() if e.get("type") != "Aborted"} or errors
        rank, first = root_cause(errors)   # the cause, not its echoes in the peers' collectives
        self.attempt_failed(job_id, token, f"rank {rank} failed: {first.get('type', 'Error')}: "
                                           f"{headline(first.get('message', ''))}", first.get("type", ""), real)

    def attempt_failed(self, job_id: str, token: str, message: str, error_type: str, rank_errors: dict) -> None:
        """End the attempt; retry the job (back to PENDING, same queue position) or fail it."""
        job = self.state.job(job_id) or {}
        if job.get("token") != token or job.get("state") != JobState.RUNNING.value:
            return
        spec = self.state.spec(job_id)
        attempt = int(job.get("attempt") or 1)
        decision = decide(attempt, spec.max_failures if spec else 0, error_type)
        history = json.loads(job.get("history") or "[]") + [
            {"attempt": attempt, "token": token, "message": message, "decision": decision.reason,
             "rank_errors": {str(k): v for k, v in rank_errors.items()}, "at": self.now()}]
        if decision.action is FailureAction.FAIL:
            self.r.hset(keys.job(job_id), "history", json.dumps(history))
            self.fail(job_id, message + (f" ({decision.reason})" if attempt > 1 or is_retryable(error_type)
                                         else ""), kind="TrainingFailedError", token=token,
                      rank_errors=rank_errors)
            return
        gang = json.loads(job.get("gang") or "{}").get("workers", [])
        prev = self.state.transition(job_id, (JobState.RUNNING,), JobState.PENDING, token=token,
                                     history=json.dumps(history), waiting=decision.reason,
                                     persisted_at=str(self.now()))   # re-queued; the placement deadline restarts
        if prev is None:
            return
        log.warning("job %s attempt %s failed (%s); %s", job_id, attempt, message, decision.reason)
        metrics.RETRIES.labels(job.get("framework", "unknown")).inc()
        self._end_attempt(job_id, token, abort=True, gang=gang)

    def fail(self, job_id: str, message: str, *, kind: str = "GangwayError", token: str = "",
             rank_errors: dict | None = None, allowed_from=_ACTIVE) -> bool:
        err = {"type": kind, "message": message,
               "rank_errors": {str(k): v for k, v in (rank_errors or {}).items()}}
        prev = self.state.transition(job_id, allowed_from, JobState.FAILED, token=token,
                                     expire_after=self._job_ttl, error=json.dumps(err),
                                     finished_at=str(self.now()))
        if prev is None:
            return False
        log.warning("job %s failed: %s", job_id, message)
        self._count_finished(job_id, "failed")
        if prev is JobState.RUNNING:
            self._end_attempt(job_id, self.r.hget(keys.job(job_id), "token") or token, abort=True)
        return True

    def cancel(self, job_id: str) -> bool:
        prev = self.state.transition(job_id, _ACTIVE, JobState.CANCELLED, expire_after=self._job_ttl,
                                     finished_at=str(self.now()),
                                     error=json.dumps({"type": "JobCancelledError",
                                                       "message": f"job {job_id} was cancelled"}))
        if prev is None:
            return self._cancel_unpersisted(job_id)
        log.info("job %s cancelled (was %s)", job_id, prev.value)
        self._count_finished(job_id, "cancelled")
        if prev is JobState.RUNNING:
            self._end_attempt(job_id, self.r.hget(keys.job(job_id), "token") or "", abort=True)
        return True

    def _cancel_unpersisted(self, job_id: str) -> bool:
        """A cancel that overtook its job's submit (both queued while the coordinator was down) leaves a
        CANCELLED record, so the submit, when it comes, does not run the job."""
        key = keys.job(job_id)
        if not self.r.hsetnx(key, "state", JobState.CANCELLED.value):
            return False   # the job exists and has ended
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={"finished_at": self.now(), "error": json.dumps(
            {"type": "JobCancelledError", "message": f"job {job_id} was cancelled before it was queued"})})
        pipe.expire(key, int(self._job_ttl))
        pipe.execute()
        log.info("job %s cancelled before its submit was persisted", job_id)
        return True

    def _count_finished(self, job_id: str, outcome: str) -> None:
        metrics.JOBS_FINISHED.labels(self.r.hget(keys.job(job_id), "framework") or "unknown", outcome).inc()

    @property
    def _job_ttl(self) -> float:
        """Ended jobs stay readable for GANGWAY_JOB_TTL_DAYS, then leave Redis (set by the ending transition)."""
        return self.settings.job_ttl_days * 86400

    def _end_attempt(self, job_id: str, token: str, *, abort: bool, gang: list[str] | None = None) -> None:
        """Tell the ranks of the attempt ``token`` it ended, then run a pass. Its gang was already released
        by the transition that ended it (``transition.lua``), so dying here strands nothing; ``gang`` is
        that attempt's (a retry may already have been placed on another gang, so it is never re-read
        after a re-queue)."""
        if gang is None:
            gang = json.loads(self.r.hget(keys.job(job_id), "gang") or "{}").get("workers", [])
        if abort:
            self.r.publish(keys.ABORT_CHANNEL, f"{job_id}:{token}")
            # Ranks still queued never start. No terminate: the running supervisors got the
            # pub/sub abort and kill their training children themselves, then report.
            self.app.control.revoke([f"{job_id}.{token}.r{rank}" for rank in range(len(gang))])
        self.schedule_pass()

    # timer ---------------------------------------------------------------
    def reap(self) -> None:
        """Repair what an interrupted step left, then judge every running attempt's ranks: a rank's own
        final status counts as its report; a dead worker or a lapsed lease counts as a lost rank."""
        now, uptime = self.now(), self.redis_uptime()
        # A TTL key says nothing until Redis has been up for a whole TTL (a restart expires them all).
        heartbeats_judged = uptime >= self.settings.heartbeat_ttl
        leases_judged = uptime >= self.settings.lease_seconds
        self.sweep_registry()
        for job_id, job in self._running_records().items():
            if job["state"] != JobState.RUNNING.value:
                self.reservations.unwatch(job_id)   # only if still not RUNNING: a pass may have placed it since
                continue
            token = job["token"]
            self._reap_ranks(job_id, job, heartbeats_judged, leases_judged)
            since = job.get("failing_since")   # marked before this read (one marked by it is not due yet)
            if since and now - float(since) > self.settings.kill_grace + 2:
                self.decide_attempt(job_id, token)   # some ranks never reported (dead or stuck)

    def _delete_worker_queue(self, worker_id: str) -> None:
        """A dropped worker's direct queue, what is queued in it and its binding: worker ids are new on every
        start, so dead ones' queues would pile up in the broker."""
        queue = keys.worker_queue(worker_id)
        try:
            with self.app.connection_for_write() as conn:
                # kombu's Redis transport: its list keys (one per priority step) and its exchange binding
                conn.default_channel._delete(queue, queue, queue, "")
        except Exception as exc:
            log.warning("worker %s: its queue %s was not deleted: %s", worker_id, queue, exc)

    def _running_records(self) -> dict[str, dict]:
        """job id -> what a verdict needs, for the running set, in one round trip (``reap.lua``): state,
        token, lease_ms, the failing-since mark and only the ranks that may need a verdict. What a task
        thread changes after this read is caught by the scripts, not by it."""
        rows = self.reservations.running_scan()
        return {job_id: {"state": state, "token": token or "", "lease_ms": lease_ms, "failing_since": failing,
                         "due": [(int(rank), wid, status, bool(alive), bool(lease))
                                 for rank, wid, status, alive, lease in due]}
                for job_id, state, token, lease_ms, failing, due in rows}

    def sweep_registry(self) -> None:
        """Drop long-dead registrations, free workers held by attempts that no longer run on them, and mend
        the free-worker index, for the next ``_SWEEP`` registered workers: a tick costs the same on any
        fleet, and a fleet of N workers is swept every N / _SWEEP ticks."""
        ids = sorted(self.r.smembers(keys.WORKERS))
        if not ids:
            return
        start = self._sweep_at if self._sweep_at < len(ids) else 0
        chunk = ids[start:start + _SWEEP]
        self._sweep_at = start + len(chunk)
        views = self.state.workers(chunk)
        for wid in self.state.prune_dead_workers(views, self.settings.dead_worker_ttl):
            log.info("worker %s dropped from the registry: dead for over %ss (GANGWAY_DEAD_WORKER_TTL)", wid,
                     self.settings.dead_worker_ttl)
            self._delete_worker_queue(wid)
        self.repair_workers(views)
        self.mend_free_index(views)

    def repair_workers(self, views: list[WorkerView]) -> list[str]:
        """Free every worker whose reservation names an attempt that does not run on it; returns their ids."""
        freed = self.reservations.repair_many([(w.info.worker_id, w.job_id) for w in views if w.job_id])
        for wid in freed:
            log.warning("worker %s was held by an attempt that no longer runs on it; freed", wid)
        return freed

    def mend_free_index(self, views: list[WorkerView]) -> list[str]:
        """Put back in line the free-index entries of these workers that disagree with their hashes (a write
        that bypassed the scripts); a dead worker's missing entry waits for its heartbeat. Returns the ids."""
        if not views:
            return []
        indexed = self.r.smismember(keys.FREE, [w.info.worker_id for w in views])
        off = [w.info.worker_id for w, member in zip(views, indexed)
               if bool(member) != (not w.job_id and not w.draining) and (member or w.alive)]
        if off:
            self.state.sync_free(off)
            log.info("free-worker index mended for %s", off)
        return off

    def _reap_ranks(self, job_id: str, job: dict, heartbeats_judged: bool, leases_judged: bool) -> None:
        """A rank that wrote its final status has reported, whatever became of its message to us. Of
        the others, a rank on a worker whose heartbeat lapsed, or whose lease (renewed by each of its
        writes, set at reservation to the rendezvous deadline plus one lease) lapsed, is lost."""
        token = job.get("token", "")
        for rank, wid, raw, alive, lease in job.get("due", ()):
            st = json.loads(raw) if raw else {}
            if st.get("state") == RankState.SUCCEEDED.value:
                self.rank_finished(job_id, token, rank, True, None, st.get("summary") or None)
                continue
            if st.get("state") in (RankState.FAILED.value, RankState.ABORTED.value):
                self.rank_failed(job_id, token, rank, st.get("error") or {
                    "type": "Error", "message": "the rank failed without an error", "traceback": ""})
                continue
            if heartbeats_judged and not alive:
                why = (f"worker {wid} stopped heartbeating (GANGWAY_HEARTBEAT_TTL="
                       f"{self.settings.heartbeat_ttl:g}s)")
            elif leases_judged and job.get("lease_ms") and not lease:
                what = f"on worker {wid} went silent" if st else f"never started on worker {wid}"
                why = f"rank {rank} {what} (GANGWAY_LEASE_SECONDS={self.settings.lease_seconds:g}s)"
            else:
                continue
            self.rank_failed(job_id, token, rank, {"type": "WorkerLostError", "traceback": "", "message": why})

    def expire_deadlines(self) -> None:
        """Fail pending or running jobs past their whole-job ``timeout``."""
        now = self.now()
        # The deadline index holds only jobs with a timeout, scored by Redis' clock at persist: a tick reads
        # what is due (O(log n)), not every pending and running job.
        due = self.r.zrangebyscore(keys.DEADLINES, "-inf", now)
        if not due:
            return
        pipe = self.r.pipeline()
        for job_id in due:
            pipe.hmget(keys.job(job_id), "timeout", "state")
        for job_id, (timeout, state) in zip(due, pipe.execute()):
            self.r.zrem(keys.DEADLINES, job_id)
            if state not in (JobState.PENDING.value, JobState.RUNNING.value):
                continue   # it ended in time (or is gone)
            where = "waiting for its gang" if state == JobState.PENDING.value else "running"
            self.fail(job_id, f"job timeout of {float(timeout or 0):g}s passed while {where} (raise the `timeout` "
                              "argument of fit()/run())", kind="JobTimeoutError")

    def tick(self) -> None:
        now = self.now()
        self.r.set(keys.COORDINATOR_ALIVE, str(now), px=int(self.settings.heartbeat_ttl * 1000))
        if self.advertise:
            self.r.hset(keys.COORDINATOR_INFO, mapping=self.advertise)
        self.expire_deadlines()
        self.r.zremrangebyscore(keys.JOBS, 0, now - self.settings.job_ttl_days * 86400)
        self.reap()
        self.publisher.sweep(now)
        self.publisher.sweep_checkpoints(now)
        self.sweep_orphans_after_restart()
        self.schedule_pass()

    def sweep_orphans_after_restart(self) -> None:
        """A Redis that restarted may have lost its last writes (a crash under appendfsync everysec), among
        them the registration of a staged upload: once per Redis run, the artifact bucket's staging area is
        listed and what no registration names is deleted. Only by a coordinator already using the store (a
        coordinator with no S3 in reach would wait GANGWAY_STORE_OUTAGE_SECONDS each tick)."""
        if self._store is None:
            return
        try:
            run_id = self.r.info("server").get("run_id", "")
        except redis.ResponseError:   # a managed Redis that refuses INFO
            return
        if self.r.get(keys.STAGING_SCANNED) != run_id and self.publisher.sweep_orphans():
            self.r.set(keys.STAGING_SCANNED, run_id)
