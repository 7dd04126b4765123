"""A seeded, randomized simulation of the coordination layer: the real Coordinator and its real Lua scripts
on a real redis-server, driven through random interleavings of submits, cancels, rank reports (ok, failed,
duplicated, late, lost), rank 0's staged artifacts (whole, partial, late writes of a lost attempt), task
redelivery, coordinator deaths between any two Redis commands, lost and returning heartbeats, lapsed leases,
workers whose clocks run up to two leases ahead of or behind the coordinator's (their ranks renew and report
with their own clock),
Redis restarts on its append-only file (clean ones, and lossy ones: SIGKILL and the file's tail cut off, as a
host crash under appendfsync everysec loses the last second) and timer ticks. After every step the
invariants of docs/architecture.md ("Invariants") are checked; at the end, under a fair schedule, every job
must end and every succeeded job's artifacts be published.

CI runs a fixed seed; ``GANGWAY_SIM_STEPS`` (and ``GANGWAY_SIM_SEED``) run a soak."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import pytest
import redis

from common import artifacts, keys
from common.models import JobState, RankState
from common.settings import Settings
from common.state import State
from common.store import MemoryStore
from tests.integration.coordination import Killed, spec
from workers.celery_app import make_app
from workers.coordinator.service import Coordinator
from workers.local import services

pytestmark = pytest.mark.integration

STEPS = int(os.environ.get("GANGWAY_SIM_STEPS", "1500"))
SEEDS = [int(s) for s in os.environ.get("GANGWAY_SIM_SEED", "13,2026").split(",")]
WORKERS = 4
ALIVE_MS = 3_600_000   # heartbeats never lapse by themselves: the simulation decides when a worker dies


class FaultyRedis(redis.Redis):
    """The coordinator's client: while armed, the process dies before any command with probability
    ``hazard`` (so every gap between two of a step's commands gets its share of deaths)."""

    hazard: float = 0.0
    rng: random.Random | None = None

    def execute_command(self, *args, **options):
        if self.hazard and self.rng.random() < self.hazard:
            self.hazard = 0.0
            raise Killed(f"coordinator killed before {args[0]}")
        return super().execute_command(*args, **options)


class AofRedis:
    """A redis-server of the simulation's own with an append-only file, restarted on demand (a clean
    shutdown: SIGTERM writes the AOF out, so the restarted server holds every acknowledged write)."""

    def __init__(self) -> None:
        self.port, self.folder = services.free_port(), tempfile.mkdtemp(prefix="gangway-sim-")
        self.cmd = services.redis_command(self.port, self.folder, appendfsync="everysec")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1

    def lossy_restart(self, rng: random.Random) -> int:
        """SIGKILL, then cut up to 4 KiB off the append-only file's tail (the writes a host crash loses
        under appendfsync everysec; redis loads the file up to its last whole command). Returns the bytes cut."""
        self.proc.kill()
        self.proc.wait(timeout=20)
        self.proc = None
        folder = os.path.join(self.folder, "appendonlydir")
        incr = sorted((f for f in os.listdir(folder) if f.endswith(".incr.aof")),
                      key=lambda f: int(f.split(".")[-3]))[-1]
        path = os.path.join(folder, incr)
        size = os.path.getsize(path)
        cut = min(size, rng.randint(1, 4096))
        with open(path, "r+b") as f:
            f.truncate(size - cut)
        self.start()
        self.restarts += 1
        return cut

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None


@pytest.fixture
def aof_redis():
    try:
        services.redis_binary()
    except Exception as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"redis-server missing under CI: {exc}")
        pytest.skip(str(exc))
    server = AofRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@dataclass
class Clock:
    """The coordinator's clock (its persisted and compared timestamps); steps move it on."""

    t: float = field(default_factory=time.time)


class SimCoordinator(Coordinator):
    """The real Coordinator with the simulation's clock; Redis has been up for long (TTL verdicts apply).
    Every fencing token its reservations issue is recorded in ``issued``."""

    def __init__(self, settings, state, app, clock: Clock, store: MemoryStore, issued: list) -> None:
        super().__init__(settings, state, app, store=store)
        self.clock = clock
        reserve = self.reservations.reserve

        def recorded(*args, **kwargs):
            token, reason = reserve(*args, **kwargs)
            if token:
                issued.append(token)
            return token, reason
        self.reservations.reserve = recorded

    def now(self) -> float:
        return self.clock.t

    def redis_uptime(self) -> float:
        return 1e9


@dataclass
class World:
    rng: random.Random
    server: AofRedis
    settings: Settings
    app: object
    clock: Clock = field(default_factory=Clock)
    coord: SimCoordinator | None = None
    queue: list = field(default_factory=list)       # coordinator tasks sent, not yet acknowledged
    delivered: list = field(default_factory=list)   # reports already delivered once (for duplicates)
    tokens: dict = field(default_factory=dict)      # job_id -> every token it ran under
    harmed: set = field(default_factory=set)        # jobs a fault or failure was injected into
    cancelled: set = field(default_factory=set)
    skew: dict = field(default_factory=dict)       # worker id -> seconds its clock is ahead (negative: behind)
    ended: dict = field(default_factory=dict)      # job_id -> the terminal state it was first seen in
    dead: set = field(default_factory=set)
    store: MemoryStore = field(default_factory=MemoryStore)
    staged: dict = field(default_factory=dict)      # (job_id, token) -> the names rank 0 staged, whole
    uploads: dict = field(default_factory=dict)     # (job_id, token) -> whether rank 0's upload was whole
    published: dict = field(default_factory=dict)   # job_id -> the first token seen published
    issued: list = field(default_factory=list)      # every token a reservation issued
    rolled_back: set = field(default_factory=set)   # jobs whose record a lossy restart may have set back
    lost: set = field(default_factory=set)          # jobs whose every write a lossy restart took
    orphans: set = field(default_factory=set)       # staged objects whose registration a lossy restart took
    submitted: int = 0
    progress_writes: int = 0
    crashes: int = 0
    cut_bytes: int = 0

    @property
    def url(self) -> str:
        return self.server.url

    def __post_init__(self) -> None:
        self.plain = State(redis.Redis.from_url(self.url, decode_responses=True))
        self.store.ensure_bucket(self.settings.artifact_bucket)
        self.restart()

    # the coordinator process ---------------------------------------------------------------------
    def restart(self) -> None:
        client = FaultyRedis.from_url(self.url, decode_responses=True)
        self.coord = SimCoordinator(self.settings, State(client), self.app, self.clock, self.store, self.issued)

    def run(self, fn, *args, crash: bool = False) -> bool:
        """Run one coordinator step; with ``crash`` it may die at a random command. Returns whether it ended."""
        self.coord.r.rng, self.coord.r.hazard = self.rng, (0.08 if crash else 0.0)
        try:
            fn(self.coord, *args)
            return True
        except Killed:
            self.crashes += 1
            self.restart()
            return False
        finally:
            self.coord.r.hazard = 0.0

    def deliver(self, task, crash: bool) -> None:
        """A coordinator task: acknowledged once it ran to its end, else redelivered later (acks_late)."""
        name, args = task
        if self.run(lambda c, *a: getattr(c, name)(*a), *args, crash=crash):
            if name == "rank_finished":
                self.delivered.append(task)
        else:
            self.queue.append(task)

    def send(self, name: str, *args, crash: bool = False) -> None:
        if self.rng.random() < 0.15:   # still queued (the coordinator is down or busy)
            self.queue.append((name, args))
        else:
            self.deliver((name, args), crash)

    # what the simulation can see ----------------------------------------------------------------------
    def running(self) -> list[tuple[str, dict]]:
        out = []
        for job_id in self.plain.r.smembers(keys.RUNNING):
            job = self.plain.job(job_id) or {}
            if job.get("state") == JobState.RUNNING.value:
                self.tokens.setdefault(job_id, set()).add(job["token"])
                out.append((job_id, job))
        return sorted(out)

    def all_jobs(self) -> list[str]:
        return [f"j{i}" for i in range(self.submitted)]

    # steps ----------------------------------------------------------------------------------------------
    def step(self) -> str:
        self.clock.t += self.rng.uniform(0.0, 1.0)
        crash = self.rng.random() < 0.4
        roll = self.rng.random()
        if roll < 0.08 and self.submitted < 60:
            job_id = f"j{self.submitted}"
            self.submitted += 1
            self.send("submit", spec(job_id, self.rng.randint(1, 3), max_failures=self.rng.randint(0, 2)),
                      crash=crash)
            return "submit"
        if roll < 0.11 and self.submitted:
            job_id = self.rng.choice(self.all_jobs())
            self.cancelled.add(job_id)
            self.send("cancel", job_id, crash=crash)
            return "cancel"
        if roll < 0.45:
            return self.rank_reports(crash)
        if roll < 0.52 and self.queue:
            self.deliver(self.queue.pop(self.rng.randrange(len(self.queue))), crash)
            return "redeliver"
        if roll < 0.56 and self.delivered:
            self.deliver(self.rng.choice(self.delivered), crash)
            return "duplicate"
        if roll < 0.60:
            return self.stale_report(crash)
        if roll < 0.62:
            return self.heartbeats()
        if roll < 0.63:
            return self.skew_clock()
        if roll < 0.66:
            return self.progress()
        if roll < 0.69:
            return self.lapse_lease()
        if roll < 0.72:
            self.restart()
            return "restart"
        if roll < 0.722:
            self.server.restart()   # every client of the coordinator and the simulation reconnects
            return "redis restart"
        if roll < 0.724:
            return self.lossy_restart()
        if self.run(Coordinator.tick, crash=crash):
            self.orphans.clear()
        return "tick"

    def rank_reports(self, crash: bool) -> str:
        running = self.running()
        if not running:
            return "idle"
        job_id, job = self.rng.choice(running)
        if self.rng.random() < 0.3:   # its ranks renewed their leases, each by its own clock, since last seen
            self.renew(job_id, job)
        token, gang = job["token"], json.loads(job["gang"])["workers"]
        failing = self.plain.r.hexists(keys.job(job_id), f"failing:{token}")
        rank = self.rng.randrange(len(gang))
        if failing:   # the abort reached this rank: it reports it, as its supervisor does
            ok, error = False, {"type": "Aborted", "message": "the coordinator aborted the attempt"}
        elif self.rng.random() < 0.85:
            ok, error = True, None
        else:
            ok = False
            error = self.rng.choice([{"type": "WorkerLostError", "message": "child killed"},
                                     {"type": "ValueError", "message": "bad label"}])
            self.harmed.add(job_id)
        if rank == 0 and ok and not self.stage(job_id, token, whole=self.rng.random() < 0.9):
            ok = False   # rank 0 died mid-upload: its supervisor reports the failure
            error = {"type": "WorkerLostError", "message": "killed while uploading"}
            self.harmed.add(job_id)
        if self.rng.random() < 0.8:   # the rank's final, fenced status (a rank killed first writes none)
            status = RankState.SUCCEEDED if ok else (RankState.ABORTED if failing else RankState.FAILED)
            self.plain.fenced_write(job_id, token, rank, {"state": status.value, "error": error, "token": token,
                                                          "updated": self.worker_time(gang[rank])})
        if self.rng.random() < 0.9:   # else the report is lost; the final status must stand for it
            self.send("rank_finished", job_id, token, rank, ok, error, {}, crash=crash)
        return "report"

    def stage(self, job_id: str, token: str, whole: bool) -> bool:
        """Rank 0's upload, as ``upload_artifacts`` makes it: registered, then its files, metadata.json last;
        each object's bytes name its attempt; once per attempt. Returns whether it was written whole."""
        if (job_id, token) in self.uploads:
            return self.uploads[(job_id, token)]
        spec_ = {"train": {}}
        bucket, prefix = artifacts.staging_location(spec_, job_id, token, self.settings.artifact_bucket)
        final = artifacts.final_location(spec_, job_id, self.settings.artifact_bucket)
        artifacts.register(self.plain.r, job_id, token, artifacts.Staged(bucket, prefix, *final))
        names = [f"part{i}.bin" for i in range(self.rng.randint(1, 3))] + [artifacts.MARKER]
        if not whole:
            names = names[:self.rng.randrange(len(names))]
        for name in names:
            data = json.dumps({"token": token}).encode() if name == artifacts.MARKER else token.encode()
            self.store.put(bucket, prefix + name, data)
        if whole:
            self.staged[(job_id, token)] = sorted(names)
        self.uploads[(job_id, token)] = whole
        return whole

    def stale_report(self, crash: bool) -> str:
        old = [(j, t) for j, ts in self.tokens.items() for t in ts
               if (self.plain.job(j) or {}).get("token") != t]
        if not old:
            return "idle"
        job_id, token = self.rng.choice(sorted(old))
        ok = self.rng.random() < 0.5
        if self.plain.r.hexists(keys.STAGED, artifacts.staged_field(job_id, token)):
            # rank 0 of the lost attempt, not dead yet, writes one more object (its next check stops it)
            bucket, prefix = artifacts.staging_location({}, job_id, token, self.settings.artifact_bucket)
            self.store.put(bucket, prefix + "late.bin", token.encode())
        self.plain.fenced_write(job_id, token, 0, {"state": "SUCCEEDED", "token": token})   # refused
        self.send("rank_finished", job_id, token, 0, ok, None if ok else {"type": "ValueError", "message": "x"},
                  {}, crash=crash)
        return "stale report"

    def heartbeats(self) -> str:
        wid = f"w{self.rng.randrange(WORKERS)}"
        if wid in self.dead:
            self.dead.discard(wid)
            self.plain.heartbeat(wid, ALIVE_MS / 1000)
            return "heartbeat returns"
        self.dead.add(wid)
        self.plain.r.delete(keys.worker_alive(wid))
        return "heartbeat lost"

    def worker_time(self, wid: str) -> float:
        """What worker ``wid``'s own clock says now."""
        return time.time() + self.skew.get(wid, 0.0)

    def skew_clock(self) -> str:
        """A worker's clock jumps up to two leases ahead or behind (NTP step, a VM resumed): no verdict may
        depend on it, so this harms no job."""
        wid = f"w{self.rng.randrange(WORKERS)}"
        self.skew[wid] = self.rng.uniform(-2, 2) * self.settings.lease_seconds
        return "clock skew"

    def progress(self) -> str:
        """The ranks of a running attempt that have not reported write a progress status stamped with their
        worker's clock (renewing their leases); a rank writes nothing after its final status."""
        running = self.running()
        if not running:
            return "idle"
        self.renew(*self.rng.choice(running))
        return "progress"

    def renew(self, job_id: str, job: dict) -> None:
        token, gang = job["token"], json.loads(job["gang"])["workers"]
        done, ranks = self.plain.r.smembers(keys.job_done(job_id, token)), self.plain.ranks(job_id)
        for rank, wid in enumerate(gang):
            if str(rank) not in done and ranks.get(rank, {}).get("state") in (None, RankState.TRAINING.value):
                self.plain.fenced_write(job_id, token, rank, {"state": RankState.TRAINING.value, "token": token,
                                                              "updated": self.worker_time(wid)})
                self.progress_writes += 1

    def lapse_lease(self) -> str:
        running = self.running()
        if not running:
            return "idle"
        job_id, job = self.rng.choice(running)
        rank = self.rng.randrange(len(json.loads(job["gang"])["workers"]))
        self.plain.r.delete(keys.rank_lease(job_id, job["token"], rank))   # the rank went silent
        self.harmed.add(job_id)
        return "lease lapsed"

    def lossy_restart(self) -> str:
        before = {j: self.plain.job(j) for j in self.all_jobs()}
        self.cut_bytes += self.server.lossy_restart(self.rng)
        self.orphans = set(self.store.list(self.settings.artifact_bucket, "staging/"))   # until a tick sweeps
        for job_id, was in before.items():
            now = self.plain.job(job_id)
            if was and not now:
                self.lost.add(job_id)
            elif was and now != was:
                self.rolled_back.add(job_id)
                self.harmed.add(job_id)   # a job set back may now fail for what it already survived
        return "lossy redis restart"

    def mark_harm(self) -> None:
        """A dead worker harms the job that holds it (its rank will be counted lost)."""
        for wid in self.dead:
            held = self.plain.r.hget(keys.worker(wid), "job")
            if held:
                self.harmed.add(held)

    # invariants -----------------------------------------------------------------------------------------
    def check(self, where: str) -> None:
        r = self.plain.r
        running = r.smembers(keys.RUNNING)
        free = r.smembers(keys.FREE)
        for wid in r.smembers(keys.WORKERS):
            job_id, token = r.hmget(keys.worker(wid), "job", "token")
            idle = not job_id and r.hget(keys.worker(wid), "draining") != "1"
            assert wid not in free or idle, f"{where}: {wid} is in the free-worker index but holds {job_id!r}"
            assert wid in free or not idle or not r.exists(keys.worker_alive(wid)), \
                f"{where}: {wid} is live and free but not in the free-worker index"
            if job_id:
                job = self.plain.job(job_id) or {}
                assert job.get("state") == "RUNNING" and job.get("token") == token, \
                    f"{where}: worker {wid} holds {job_id}@{token}, which is {job.get('state')}@{job.get('token')}"
                assert wid in json.loads(job["gang"])["workers"], f"{where}: {wid} not in {job_id}'s gang"
        for job_id in self.all_jobs():
            job = self.plain.job(job_id) or {}
            state = job.get("state")
            assert (state == "RUNNING") == (job_id in running), f"{where}: {job_id} is {state}, running set says " \
                                                                 f"{job_id in running}"
            if state == "RUNNING":
                for rank, st in self.plain.ranks(job_id).items():
                    assert st.get("token") == job["token"], f"{where}: {job_id} shows rank {rank} of {st.get('token')}"
            if state == "FAILED":
                error = json.loads(job["error"])
                assert error["type"] != "PlacementError", f"{where}: {job_id} failed placement: {error}"
                assert job_id in self.harmed, f"{where}: {job_id} failed with nothing injected: {error}"
            if state == "CANCELLED":
                assert job_id in self.cancelled, f"{where}: {job_id} cancelled by nobody"
            if state in ("SUCCEEDED", "FAILED", "CANCELLED") and job_id not in self.rolled_back | self.lost:
                first = self.ended.setdefault(job_id, state)
                assert state == first, f"{where}: {job_id} ended {first}, now {state}"
            elif job_id in self.ended and job_id not in self.rolled_back | self.lost:
                raise AssertionError(f"{where}: {job_id} ended {self.ended[job_id]}, now {state}")
            self.check_artifacts(where, job_id, job)
        assert len(self.issued) == len(set(self.issued)), f"{where}: a fencing token was issued twice"
        for key in self.store.list(self.settings.artifact_bucket, "staging/"):
            job_id, token = key.split("/")[1:3]
            assert key in self.orphans or r.hexists(keys.STAGED, artifacts.staged_field(job_id, token)), \
                f"{where}: {key} staged by an attempt no sweep will ever look at"

    def check_artifacts(self, where: str, job_id: str, job: dict) -> None:
        """The model folder holds only the attempt the record names as published (or, mid-copy, the
        attempt that won), nothing for a job that did not succeed, and the first publication is never
        replaced (no double success, even after a lossy restart)."""
        bucket = self.settings.artifact_bucket
        folder = self.store.list(bucket, f"model/{job_id}/")
        published = job.get("published")
        if published:
            first = self.published.setdefault(job_id, published)
            assert published == first, f"{where}: {job_id} published {first}, now {published}"
            names = sorted(k.rsplit("/", 1)[1] for k in folder)
            assert names == self.staged[(job_id, published)], f"{where}: {job_id}'s model folder {names}"
        if not folder:
            return
        tokens = {json.loads(d)["token"] if k.endswith(artifacts.MARKER) else d.decode()
                  for k in folder for d in [self.store.get(bucket, k)]}
        if job_id in self.rolled_back or job_id in self.lost:   # published before Redis lost its last writes
            assert tokens == {self.published.get(job_id, next(iter(tokens)))}, f"{where}: {job_id} {tokens}"
            return
        assert job.get("state") == "SUCCEEDED", f"{where}: {job_id} is {job.get('state')} with artifacts {folder}"
        assert tokens == {published or job["token"]}, \
            f"{where}: {job_id}'s model folder mixes attempts {tokens} (record names {published or job['token']})"

    # a fair schedule, no more faults ----------------------------------------------------------------------
    def drain(self, seconds: float = 30.0) -> None:
        self.settle(seconds)
        self.clock.t += 1.0
        self.coord.tick()   # the sweep after the last endings
        self.check("drained")
        for job_id in self.all_jobs():
            job = self.plain.job(job_id) or {}
            if job.get("state") == "SUCCEEDED":
                assert job.get("published"), f"{job_id} succeeded, its artifacts never published"
        left = self.store.list(self.settings.artifact_bucket, "staging/")
        assert not left, f"staged objects left after every job ended: {left}"

    def settle(self, seconds: float) -> None:
        for wid in list(self.dead):
            self.plain.heartbeat(wid, ALIVE_MS / 1000)
        self.dead.clear()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            while self.queue:
                self.deliver(self.queue.pop(0), crash=False)
            for job_id, job in self.running():
                done = self.plain.r.smembers(keys.job_done(job_id, job["token"]))
                failing = self.plain.r.hexists(keys.job(job_id), f"failing:{job['token']}")
                for rank in range(len(json.loads(job["gang"])["workers"])):
                    if str(rank) not in done:
                        error = {"type": "Aborted", "message": "aborted"} if failing else None
                        if rank == 0 and not failing:
                            self.stage(job_id, job["token"], whole=True)
                        self.coord.rank_finished(job_id, job["token"], rank, not failing, error, {})
            self.clock.t += 1.0
            self.coord.tick()
            self.check("drain")
            states = [self.plain.job_state(j) for j in self.all_jobs() if j not in self.lost]
            if all(s is not None and s.is_terminal for s in states):
                return
            time.sleep(0.05)   # a crashed pass's scheduling lock (5 s) may still be held
        stuck = {j: self.plain.job_state(j) for j in self.all_jobs()
                 if j not in self.lost and not (self.plain.job_state(j) or JobState.PENDING).is_terminal}
        raise AssertionError(f"jobs never ended under a fair schedule: {stuck}")


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_interleaving_of_faults_keeps_every_invariant_and_every_job_ends(aof_redis, seed):
    settings = Settings.from_env({}, broker_url=aof_redis.url, heartbeat_ttl=600.0, lease_seconds=600.0,
                                 rendezvous_timeout=600.0, kill_grace=0.0, placement_timeout=1e6)
    app = make_app(settings)
    world = World(random.Random(seed), aof_redis, settings, app)
    from tests.integration.coordination import add_worker
    for i in range(WORKERS):
        add_worker(world.plain, f"w{i}", 30000 + 10 * i, ttl=ALIVE_MS / 1000)
    history: list[str] = []
    try:
        for n in range(STEPS):
            if n == STEPS // 2 and aof_redis.restarts == 0:   # the roll is rare (0.2 %): make sure one happens
                aof_redis.restart()
                history.append("redis restart (forced)")
            if n == 2 * STEPS // 3 and not world.cut_bytes:   # and one lossy restart
                history.append(world.lossy_restart() + " (forced)")
            history.append(world.step())
            world.mark_harm()
            world.check(f"seed {seed} step {n} ({history[-1]}; last: {history[-6:-1]})")
        world.drain()
    finally:
        app.close()
    ended = [world.plain.job_state(j) for j in world.all_jobs()]
    if STEPS >= 1000:   # the run explored what it is meant to (a short GANGWAY_SIM_STEPS run may not)
        assert world.submitted >= 20 and world.crashes >= 20 and aof_redis.restarts >= 1
        assert JobState.SUCCEEDED in ended and history.count("tick") > 50 and world.published
        # (progress writes are not required: whether a job runs when a progress step is drawn depends on
        # real TTLs, so a loaded box can draw none; the invariants above hold either way)
        assert world.cut_bytes > 0 and history.count("clock skew") > 3
