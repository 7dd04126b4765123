#!/usr/bin/env python
"""Gangway load benchmark: a real fleet under concurrent producers, and a simulated fleet at scale.

    python bench/load.py [--part both|real|sim] [--producers 8] [--jobs-per-producer 25] [--workers 4]
                         [--sim-workers 1000] [--sim-jobs 10000] [--reservations 5000] [--sim-place 2000]

real: a private fleet (redis-server, weed mini, coordinator, 4 workers on free ports), one small
dataset uploaded once, 8 spawned producer processes each submitting 25 one-worker XGBoost jobs and
waiting for them. Checks every job ran exactly once; reports jobs/s, queue wait, end-to-end latency.

sim: a bare redis-server, 1,000 registered workers (registry entries only) and 10,000 pending jobs
persisted by ``Coordinator.submit``. Times ``Reservations.reserve`` (client and Lua side) over
gangs of mixed sizes, then the real ``Coordinator.schedule_pass`` placing jobs as workers free up
(train_rank messages go to the workers' Redis queues and are counted, then deleted).

Prints a markdown table. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the checkout this script sits in, not whichever one the virtualenv's editable install points at
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from overhead import FEATURES, LABEL, free_port_block, log, make_data, print_table, row, to_arrow

from common import keys
from common.models import JobSpec, JobState, Placement, Resources, WorkerInfo
from common.settings import Settings
from common.state import State, connect
from common.store import S3Store
from workers.celery_app import make_app
from workers.coordinator.scheduler import compute_rendezvous
from workers.coordinator.service import Coordinator
from workers.local import services
from workers.local.fleet import Fleet

PARAMS = {"objective": "binary:logistic", "max_depth": 4, "tree_method": "hist"}
SIM_SIZES = (1, 1, 1, 2, 2, 4, 8, 16, 32)   # gang sizes of the simulated jobs, drawn uniformly
RESERVE_P99_TARGET = 0.005


def pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def _text(value) -> str:
    """SLOWLOG entries come back as bytes even on a decoding client."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# real fleet ------------------------------------------------------------------------------------
def producer(index: int, uri: str, jobs: int, rounds: int, barrier, results) -> None:
    """One producer process: submit ``jobs`` one-worker XGBoost jobs back to back, then wait for each."""
    from producer.connectors import DataConnector
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    out: dict = {"producer": index, "jobs": [], "errors": []}
    try:
        conn = DataConnector.from_uri(uri)
        barrier.wait(timeout=300)
        handles = []
        for _ in range(jobs):
            est = XGBEstimator(n_estimators=rounds, params=dict(PARAMS),
                               scaling_config=XGBScalingConfig(num_workers=1))
            t0 = time.time()
            handles.append((est.submit(conn, input_cols=FEATURES, label_col=LABEL), time.time() - t0))
        for job, submit_call in handles:
            try:
                job.wait(timeout=1800)   # returns the downloaded Booster
                out["jobs"].append({"job_id": job.job_id, "submit_call": submit_call})
            except Exception as exc:
                out["errors"].append(f"{job.job_id}: {type(exc).__name__}: {exc}")
    except Exception as exc:
        out["errors"].append(f"producer {index}: {type(exc).__name__}: {exc}")
    results.put(out)


def start_real_fleet(home: str, workers: int, aof: str) -> Fleet:
    base = free_port_block(10 * workers)
    # The burst queues 200 jobs on 4 workers: the placement deadline must outlast the backlog.
    settings = Settings.from_env({}, home=home, broker_url=f"redis://127.0.0.1:{services.free_port()}/0",
                                 s3_endpoint=f"http://127.0.0.1:{services.free_port()}",
                                 worker_ports=f"{base}-{base + 9}", placement_timeout=1800.0,
                                 redis_appendfsync=aof)
    os.environ.update(settings.as_env())   # the spawned producers' Client.default() reads GANGWAY_*
    fleet = Fleet(settings, workers=workers)
    fleet.start(timeout=180)
    return fleet


def run_producers(uri: str, a: argparse.Namespace) -> tuple[list[dict], list[str], float, float]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(a.producers + 1), ctx.Queue()
    procs = [ctx.Process(target=producer, args=(i, uri, a.jobs_per_producer, a.rounds, barrier, results))
             for i in range(a.producers)]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)   # every producer imported and connected: go
    t0 = time.time()
    outs = [results.get(timeout=3600) for _ in procs]
    t1 = time.time()
    for p in procs:
        p.join(timeout=60)
    jobs = [j for o in outs for j in o["jobs"]]
    errors = [e for o in outs for e in o["errors"]]
    errors += [f"producer exit code {p.exitcode}" for p in procs if p.exitcode]
    return jobs, errors, t0, t1


def verify_real(fleet: Fleet, jobs: list[dict], expected: int) -> tuple[list[dict], list[str]]:
    """Every job SUCCEEDED on its first attempt, each rank delivered once, artifacts once; none lost."""
    settings = fleet.settings
    state = State(connect(settings))
    store = S3Store(settings)
    problems: list[str] = []
    in_redis = state.r.zrange(keys.JOBS, 0, -1)
    mine = {j["job_id"] for j in jobs}
    if len(in_redis) != expected:
        problems.append(f"{len(in_redis)} jobs in Redis ({keys.JOBS}), expected {expected}")
    if set(in_redis) != mine:
        problems.append(f"jobs in Redis but not returned to a producer: {sorted(set(in_redis) - mine)[:5]}; "
                        f"returned but not in Redis: {sorted(mine - set(in_redis))[:5]}")
    all_artifacts = store.list(settings.artifact_bucket, "model/")
    by_job: dict[str, list[str]] = {}
    for key in all_artifacts:
        by_job.setdefault(key.split("/")[1], []).append(key.split("/", 2)[2])
    names = None
    records = []
    for job_id in sorted(set(in_redis) | mine):
        rec = state.job(job_id) or {}
        records.append({**rec, "rank0": state.ranks(job_id).get(0, {})})
        token = rec.get("token", "")
        deliveries = state.r.hgetall(keys.deliveries(job_id, token))
        files = sorted(by_job.get(job_id, []))
        names = names or files
        if rec.get("state") != JobState.SUCCEEDED.value:
            problems.append(f"job {job_id} is {rec.get('state')}: {rec.get('error', '')[:200]}")
        if rec.get("attempt") != "1":
            problems.append(f"job {job_id} ran {rec.get('attempt')} attempts")
        if deliveries != {"0": "1"}:
            problems.append(f"job {job_id} rank deliveries {deliveries} (expected {{'0': '1'}})")
        if not files or files != names or "model.ubj" not in files:
            problems.append(f"job {job_id} artifacts {files} (first job had {names})")
        stale = [k for k in state.r.keys(f"{keys.job(job_id)}:deliveries:*") if not k.endswith(f":{token}")]
        if stale:
            problems.append(f"job {job_id} has deliveries of other attempts: {stale}")
    extra = set(by_job) - mine
    if extra:
        problems.append(f"artifacts of unknown jobs: {sorted(extra)[:5]}")
    queues = [keys.COORDINATOR_QUEUE, *(keys.worker_queue(w) for w in fleet.worker_ids)]
    left = {q: state.r.llen(q) for q in queues if state.r.llen(q)}
    if left:
        problems.append(f"messages left in queues: {left}")
    if state.r.zcard(keys.PENDING) or state.r.scard(keys.RUNNING):
        problems.append(f"{state.r.zcard(keys.PENDING)} pending and {state.r.scard(keys.RUNNING)} running jobs left")
    return records, problems


def coordinator_pass_histogram(fleet: Fleet) -> dict | None:
    """``gangway_scheduling_pass_seconds`` scraped from the coordinator's /metrics, if it exports one."""
    url = fleet_coordinator_metrics_url(fleet)
    if not url:
        return None
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError as exc:
        log(f"coordinator metrics at {url} did not answer: {exc}")
        return None
    buckets, count, total = [], 0.0, 0.0
    for line in text.splitlines():
        if line.startswith("gangway_scheduling_pass_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
        elif line.startswith("gangway_scheduling_pass_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith("gangway_scheduling_pass_seconds_sum"):
            total = float(line.rsplit(" ", 1)[1])
    if not count:
        return None
    return {"url": url, "count": count, "mean": total / count, "buckets": sorted(buckets)}


def fleet_coordinator_metrics_url(fleet: Fleet) -> str:
    """The coordinator's /metrics URL as it advertises it in Redis ('' when it has none)."""
    return State(connect(fleet.settings)).r.hget(keys.COORDINATOR_INFO, "metrics_url") or ""


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> str:
    """The upper bound of the histogram bucket holding quantile ``q`` (what Prometheus can say at best)."""
    total = buckets[-1][1]
    for le, n in buckets:
        if n >= q * total:
            return f"<= {ms(le)}" if le != float("inf") else "> last bucket"
    return "?"


def stages(records: list[dict]) -> dict[str, list[float]]:
    """Where a job's time goes after its gang is reserved: the job record and rank 0's status timestamps."""
    def span(rec: dict, start: str, end: str) -> float | None:
        t = {**rec["rank0"], **{k: v for k, v in rec.items() if k != "rank0"}}
        return float(t[end]) - float(t[start]) if t.get(start) and t.get(end) else None

    marks = {"reserved -> rank fetching (delivery, standby child taken)": ("started_at", "t_fetching"),
             "rank fetching -> waiting (child start-up, shard fetch)": ("t_fetching", "t_waiting"),
             "rank waiting -> training (barrier)": ("t_waiting", "t_training"),
             "rank training -> uploading (collective, DMatrix, train, child exit)": ("t_training", "t_uploading"),
             "rank uploading -> rank SUCCEEDED (artifacts)": ("t_uploading", "t_succeeded"),
             "rank training -> rank SUCCEEDED (all of the above + artifacts)": ("t_training", "t_succeeded"),
             "rank SUCCEEDED -> job SUCCEEDED (report to the coordinator)": ("t_succeeded", "finished_at")}
    out = {name: [x for x in (span(r, *m) for r in records) if x is not None] for name, m in marks.items()}
    fetch = [(r["rank0"].get("fetch") or {}).get("fetch_seconds") for r in records]
    out["shard fetch inside the rank (its fetch_seconds)"] = [float(x) for x in fetch if x is not None]
    summaries = [json.loads(r.get("rank0_summary") or "{}") for r in records]
    for key in ("connect_seconds", "dmatrix_seconds", "train_seconds"):   # the XGBoost runner's own clock
        out[f"rank 0 {key}"] = [float(x[key]) for x in summaries if x.get(key) is not None]
    return out


def real_part(a: argparse.Namespace, tmp: str, aof: str) -> list[str]:
    from producer.connectors import DataConnector
    total = a.producers * a.jobs_per_producer
    fleet = None
    try:
        log(f"starting a private fleet ({a.workers} workers, Redis AOF {aof})")
        fleet = start_real_fleet(os.path.join(tmp, f"home-{aof}-{time.monotonic_ns()}"), a.workers, aof)
        settings = fleet.settings
        X, y = make_data(a.rows, seed=7)
        uri = DataConnector.from_arrow(to_arrow(X, y)).materialise(S3Store(settings), settings).uri
        log(f"dataset {a.rows:,} rows uploaded once: {uri}")
        log(f"{a.producers} producers x {a.jobs_per_producer} one-worker jobs ({a.rounds} rounds)")
        jobs, errors, t0, t1 = run_producers(uri, a)
        log(f"producers done in {t1 - t0:.1f}s; verifying")
        records, problems = verify_real(fleet, jobs, total)
        hist = coordinator_pass_histogram(fleet)
    finally:
        if fleet is not None:
            log("stopping the fleet")
            fleet.stop()
    problems = errors + problems
    for p in problems[:20]:
        log(f"PROBLEM: {p}")
    ok = [r for r in records if r.get("state") == JobState.SUCCEEDED.value]
    sub = [float(r["submitted_at"]) for r in ok]
    wait = [float(r["started_at"]) - float(r["submitted_at"]) for r in ok]
    e2e = [float(r["finished_at"]) - float(r["submitted_at"]) for r in ok]
    persist = [float(r["persisted_at"]) - float(r["submitted_at"]) for r in ok]
    span = max(float(r["finished_at"]) for r in ok) - min(sub) if ok else float("nan")
    calls = [j["submit_call"] for j in jobs]
    rows = [
        row("jobs submitted / succeeded / problems", f"{total} / {len(ok)} / {len(problems)}",
            f"{total} / {total} / 0", len(ok) == total and not problems),
        row("jobs in Redis (none lost, none duplicated)", f"{len(records)}", f"{total}", len(records) == total),
        row("every job: attempt 1, rank 0 delivered once, artifacts once", "yes" if not problems else "NO",
            "yes", not problems),
        row(f"throughput, first submit -> last finish (jobs/s), Redis AOF {aof}", f"{len(ok) / span:.2f}"),
        row("producers' wall time, barrier -> all waits returned (s)", f"{t1 - t0:.1f}"),
        row("submit() call in the producer, p50 / p99", f"{ms(pct(calls, 50))} / {ms(pct(calls, 99))}"),
        row("queue wait submitted_at -> started_at (reserved), p50", ms(pct(wait, 50))),
        row("queue wait submitted_at -> started_at (reserved), p99", ms(pct(wait, 99))),
        row("  of which submitted_at -> persisted_at, p50 / p99", f"{ms(pct(persist, 50))} / {ms(pct(persist, 99))}"),
        row("end to end submitted_at -> finished_at, p50", ms(pct(e2e, 50))),
        row("end to end submitted_at -> finished_at, p99", ms(pct(e2e, 99))),
        *(row(f"  stage p50 / p99: {name}", f"{ms(pct(xs, 50))} / {ms(pct(xs, 99))}")
          for name, xs in stages(ok).items() if xs),
    ]
    if hist:
        rows += [
            row(f"coordinator scheduling pass, mean of {hist['count']:.0f} (gangway_scheduling_pass_seconds)",
                ms(hist["mean"])),
            row("coordinator scheduling pass p50 / p99 (histogram bucket)",
                f"{bucket_quantile(hist['buckets'], 0.5)} / {bucket_quantile(hist['buckets'], 0.99)}"),
        ]
    else:
        rows.append(row("coordinator scheduling pass (gangway_scheduling_pass_seconds)",
                        "not exported by this build; see the simulated fleet's pass rows"))
    return rows


# simulated fleet -------------------------------------------------------------------------------
def start_bare_redis(tmp: str) -> tuple[subprocess.Popen, str]:
    port = services.free_port()
    data = os.path.join(tmp, "sim-redis")
    os.makedirs(data, exist_ok=True)
    proc = subprocess.Popen(services.redis_command(port, data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 20
    while not services.port_open("127.0.0.1", port):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"redis-server on port {port} did not start (exit {proc.poll()})")
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def sim_worker(i: int) -> WorkerInfo:
    """Eight workers per host, as on an 8-GPU node; registry entries only, nothing consumes their queues."""
    wid = f"sim-{i:04d}"
    host = i // 8
    return WorkerInfo(worker_id=wid, host=f"node-{host:03d}", address=f"10.{host // 256}.{host % 256}.1",
                      queue=keys.worker_queue(wid), port_lo=29500 + 10 * (i % 8), port_hi=29509 + 10 * (i % 8),
                      cpus=8, pid=100000 + i, started_at=time.time())


def sim_spec(i: int, size: int) -> JobSpec:
    return JobSpec(job_id=f"sim-{i:05d}-{uuid.uuid4().hex[:6]}", framework="xgboost",
                   resources=Resources(num_workers=size, num_cpu_per_worker=1),
                   datasets={"train": {"uri": f"s3://gangway-data/datasets/{'0' * 64}/", "sharded": True,
                                       "rows": 1_000_000, "uploaded_bytes": 0}},
                   params={"objective": "binary:logistic", "max_depth": 6, "nthread": 1},
                   train={"num_boost_round": 100, "input_cols": FEATURES, "label_col": LABEL, "weight_col": None,
                          "verbose_eval": None, "early_stopping_rounds": None},
                   submitted_at=time.time(), max_failures=1)


class ScheduleLock:
    """Hold the coordinator's scheduling lock, so the passes that submit and rank_finished run themselves
    return at once (we time the passes separately)."""

    def __init__(self, r) -> None:
        self.r, self.value = r, f"bench-{uuid.uuid4().hex}"

    def __enter__(self):
        while not self.r.set(keys.SCHEDULE_LOCK, self.value, nx=True, px=600_000):
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        if self.r.get(keys.SCHEDULE_LOCK) == self.value:
            self.r.delete(keys.SCHEDULE_LOCK)


def sim_setup(coord: Coordinator, a: argparse.Namespace) -> dict:
    state, r = coord.state, coord.r
    t0 = time.perf_counter()
    for i in range(a.sim_workers):
        state.register_worker(sim_worker(i), ttl=24 * 3600)
    m = {"register_s": time.perf_counter() - t0}
    rng = random.Random(11)
    with ScheduleLock(r):
        t0 = time.perf_counter()
        for i in range(a.sim_jobs):
            st = coord.submit(sim_spec(i, rng.choice(SIM_SIZES)))
            if st is not JobState.PENDING:
                raise RuntimeError(f"simulated job {i} was not persisted as PENDING: {st}")
        m["submit_s"] = time.perf_counter() - t0
    if r.zcard(keys.PENDING) != a.sim_jobs or r.scard(keys.WORKERS) != a.sim_workers:
        raise RuntimeError(f"{r.zcard(keys.PENDING)} pending, {r.scard(keys.WORKERS)} workers after setup")
    for q in (keys.COORDINATOR_QUEUE, *(keys.worker_queue(f"sim-{i:04d}") for i in range(a.sim_workers))):
        if r.llen(q):
            raise RuntimeError(f"submit enqueued {r.llen(q)} messages on {q}")
    return m


def reservation_latency(coord: Coordinator, a: argparse.Namespace) -> dict:
    """Reserve ``--reservations`` pending jobs on random free gangs of their size, holding gangs until
    the fleet runs short, then releasing the oldest (and re-queueing those jobs, as a retry does)."""
    r, res, state = coord.r, coord.reservations, coord.state
    views = {w.info.worker_id: w for w in state.workers()}
    free = list(views)
    rng = random.Random(5)
    ids = r.zrange(keys.PENDING, 0, a.reservations - 1)
    sizes = {j: state.spec(j).resources.num_workers for j in ids}
    held: list[tuple[str, str, list[str]]] = []
    lat: dict[int, list[float]] = {}
    rejected, release_lat, violations = [], [], []
    lua: list[float] = []
    r.config_set("slowlog-log-slower-than", 0)   # every command: the newest entry after a reserve is its EVALSHA
    for n, job_id in enumerate(ids):
        size = sizes[job_id]
        while len(free) < size:
            old_job, old_token, gang = held.pop(0)
            t0 = time.perf_counter()
            released = res.release(old_job, old_token, gang)
            release_lat.append(time.perf_counter() - t0)
            if released != len(gang):
                violations.append(f"release of {old_job} freed {released} of {len(gang)} workers")
            state.transition(old_job, (JobState.RUNNING,), JobState.PENDING, token=old_token)
            free.extend(gang)
        gang = rng.sample(free, size)
        if n % 10 == 0 and held:   # a gang with one worker already held: refused whole, nothing written
            busy = held[-1][2][0]
            placement = Placement(job_id, tuple([*gang[:-1], busy]), False)
            t0 = time.perf_counter()
            token, reason = res.reserve(placement, compute_rendezvous([views[w] for w in placement.worker_ids]),
                                        coord.settings.lease_seconds)
            rejected.append(time.perf_counter() - t0)
            if token or not reason.startswith("busy:"):
                violations.append(f"reserve over busy worker {busy} returned {token!r}, {reason!r}")
            written = [w for w in gang[:-1] if r.hget(keys.worker(w), "job")]
            if written:
                violations.append(f"refused reservation of {job_id} still wrote workers {written}")
        placement = Placement(job_id, tuple(sorted(gang)), False)
        rdv = compute_rendezvous([views[w] for w in placement.worker_ids])
        t0 = time.perf_counter()
        token, reason = res.reserve(placement, rdv, coord.settings.lease_seconds)
        lat.setdefault(size, []).append(time.perf_counter() - t0)
        newest = r.slowlog_get(1)
        if newest and _text(newest[0]["command"]).startswith(f"EVALSHA {res._reserve.sha}"):
            lua.append(newest[0]["duration"] / 1e6)
        if n % 100 == 0:
            r.slowlog_reset()   # the commands the scripts call are logged too (Redis < 7): keep it short
        if not token:
            violations.append(f"reserve of {job_id} on free workers refused: {reason}")
            continue
        for w in gang:
            free.remove(w)
        held.append((job_id, token, list(placement.worker_ids)))
    r.config_set("slowlog-log-slower-than", 10000)
    r.slowlog_reset()
    for job_id, token, gang in held:   # back to 10,000 pending and every worker free
        res.release(job_id, token, gang)
        state.transition(job_id, (JobState.RUNNING,), JobState.PENDING, token=token)
    busy = [w.info.worker_id for w in state.workers() if w.job_id]
    if busy or r.zcard(keys.PENDING) != a.sim_jobs:
        violations.append(f"after the reservations: {len(busy)} workers busy, {r.zcard(keys.PENDING)} pending")
    return {"lat": lat, "rejected": rejected, "release": release_lat, "lua": lua, "violations": violations}


def finish_running(coord: Coordinator) -> tuple[int, float]:
    """Report every rank of every running job finished, through ``Coordinator.rank_finished``."""
    n, t0 = 0, time.perf_counter()
    for job_id in coord.r.smembers(keys.RUNNING):
        rec = coord.state.job(job_id)
        world = len(json.loads(rec["gang"])["workers"])
        for rank in range(world):
            coord.rank_finished(job_id, rec["token"], rank, True)
        n += 1
    return n, time.perf_counter() - t0


def drain_worker_queues(coord: Coordinator, worker_ids: list[str]) -> int:
    pipe = coord.r.pipeline()
    for w in worker_ids:
        pipe.llen(keys.worker_queue(w))
    count = sum(pipe.execute())
    pipe = coord.r.pipeline()
    for w in worker_ids:
        pipe.delete(keys.worker_queue(w))
    pipe.execute()
    return count


def scheduling_throughput(coord: Coordinator, a: argparse.Namespace) -> dict:
    """Passes over 10,000 pending jobs; between passes every running job finishes (workers free up)."""
    r, state = coord.r, coord.state
    worker_ids = sorted(r.smembers(keys.WORKERS))
    passes: list[tuple[int, float]] = []
    violations: list[str] = []
    finish: list[tuple[int, float]] = []
    placed_total = messages = ranks = 0
    while placed_total < a.sim_place:
        t0 = time.perf_counter()
        placed = coord.schedule_pass()
        passes.append((placed, time.perf_counter() - t0))
        placed_total += placed
        running = list(r.smembers(keys.RUNNING))
        want = sum(len(json.loads(r.hget(keys.job(j), "gang"))["workers"]) for j in running)
        got = drain_worker_queues(coord, worker_ids)
        messages, ranks = messages + got, ranks + want
        if placed == 0 or len(running) != placed or got != want:
            violations.append(f"pass placed {placed}, {len(running)} running, {got} train_rank messages "
                              f"for {want} ranks")
            break
        with ScheduleLock(r):
            finish.append(finish_running(coord))
    # A full fleet: passes that place nothing (the head job waits) are what every submit and finish pays.
    while coord.schedule_pass():
        pass
    drain_worker_queues(coord, worker_ids)
    blocked = []
    for _ in range(20):
        t0 = time.perf_counter()
        if coord.schedule_pass():
            violations.append("a pass on a full fleet placed a job")
        blocked.append(time.perf_counter() - t0)
    ticks: dict[str, list[float]] = {"tick": [], "expire_deadlines": [], "reap": []}
    for _ in range(5):   # the timer's work every GANGWAY_SCHEDULE_INTERVAL, and its two sweeps alone
        for name, fn in (("tick", coord.tick), ("expire_deadlines", coord.expire_deadlines), ("reap", coord.reap)):
            t0 = time.perf_counter()
            fn()
            ticks[name].append(time.perf_counter() - t0)
    ranks_running = sum(len(json.loads(r.hget(keys.job(j), "gang"))["workers"]) for j in r.smembers(keys.RUNNING))
    free = sum(w.free for w in state.workers())
    return {"passes": passes, "blocked": blocked, "ticks": ticks, "finish": finish, "violations": violations,
            "messages": messages, "ranks": ranks, "free_at_end": free, "ranks_running": ranks_running,
            "jobs_running": r.scard(keys.RUNNING)}


def sim_part(a: argparse.Namespace, tmp: str) -> list[str]:
    proc, url = start_bare_redis(tmp)
    try:
        settings = Settings.from_env({}, home=os.path.join(tmp, "sim-home"), broker_url=url)
        coord = Coordinator(settings, State(connect(settings)), make_app(settings))
        log(f"simulated fleet: registering {a.sim_workers:,} workers, submitting {a.sim_jobs:,} jobs")
        setup = sim_setup(coord, a)
        log(f"timing {a.reservations:,} reservations")
        rv = reservation_latency(coord, a)
        log(f"scheduling passes until {a.sim_place:,} jobs are placed")
        th = scheduling_throughput(coord, a)
        mem = coord.r.info("memory")["used_memory_human"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    for v in (rv["violations"] + th["violations"])[:20]:
        log(f"PROBLEM: {v}")
    every = [x for xs in rv["lat"].values() for x in xs]
    p99 = pct(every, 99)
    placed = sum(n for n, _ in th["passes"])
    pass_s = sum(s for _, s in th["passes"])
    full = th["passes"]
    done = sum(n for n, _ in th["finish"])
    rows = [
        row("simulated workers registered / jobs pending", f"{a.sim_workers:,} / {a.sim_jobs:,}"),
        row("Coordinator.submit, persist rate (jobs/s)", f"{a.sim_jobs / setup['submit_s']:,.0f}"),
        row(f"reservation (token + reserve.lua), p50 of {len(every):,}", ms(pct(every, 50))),
        row(f"reservation (token + reserve.lua), p99 of {len(every):,}", ms(p99), "<= 5 ms",
            p99 <= RESERVE_P99_TARGET),
        *(row(f"  gang of {size}: p50 / p99 ({len(xs)})", f"{ms(pct(xs, 50))} / {ms(pct(xs, 99))}")
          for size, xs in sorted(rv["lat"].items())),
        row(f"  reserve.lua inside Redis (SLOWLOG), p50 / p99 of {len(rv['lua']):,}",
            f"{ms(pct(rv['lua'], 50))} / {ms(pct(rv['lua'], 99))}"),
        row(f"  refused reservation (one worker busy), p99 of {len(rv['rejected'])}", ms(pct(rv["rejected"], 99))),
        row(f"  release.lua, p99 of {len(rv['release']):,}", ms(pct(rv["release"], 99))),
        row("all-or-nothing and release checks", "ok" if not rv["violations"] else f"{len(rv['violations'])} failed",
            "ok", not rv["violations"]),
        row(f"scheduling pass placing jobs, p50 / p99 of {len(full)} passes",
            f"{ms(pct([s for _, s in full], 50))} / {ms(pct([s for _, s in full], 99))}"),
        row("  jobs placed per pass (first 100 pending are read), mean", f"{placed / max(1, len(full)):.1f}"),
        row("scheduling throughput, jobs placed / pass time (jobs/s)", f"{placed / pass_s:,.0f}"),
        row("  train_rank messages in the workers' queues / ranks placed", f"{th['messages']:,} / {th['ranks']:,}",
            "equal", th["messages"] == th["ranks"]),
        row(f"scheduling pass on a full fleet (places nothing), p50 / p99 of {len(th['blocked'])}",
            f"{ms(pct(th['blocked'], 50))} / {ms(pct(th['blocked'], 99))}"),
        row(f"coordinator timer tick on a full fleet ({th['jobs_running']} jobs / {th['ranks_running']} ranks "
            f"running), p50", ms(pct(th["ticks"]["tick"], 50))),
        row("  of which expire_deadlines over the pending jobs, p50", ms(pct(th["ticks"]["expire_deadlines"], 50))),
        row("  of which reap over the running jobs, p50", ms(pct(th["ticks"]["reap"], 50))),
        row("rank_finished -> SUCCEEDED + release (jobs/s)",
            f"{done / sum(s for _, s in th['finish']):,.0f}" if done else "-"),
        row("scheduling checks (one message per rank, nothing placed on a full fleet)",
            "ok" if not th["violations"] else f"{len(th['violations'])} failed", "ok", not th["violations"]),
        row("Redis memory at the end", mem),
    ]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("both", "real", "sim"), default="both")
    ap.add_argument("--producers", type=int, default=8)
    ap.add_argument("--jobs-per-producer", type=int, default=25)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4000, help="rows of the real part's dataset")
    ap.add_argument("--rounds", type=int, default=5, help="boosting rounds of each real job")
    ap.add_argument("--redis-appendfsync", default="everysec",
                    help="the embedded Redis' AOF policy; a comma list (e.g. off,everysec) runs the real part once "
                         "per policy, alternating, to measure what persistence costs")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the real part per AOF policy")
    ap.add_argument("--sim-workers", type=int, default=1000)
    ap.add_argument("--sim-jobs", type=int, default=10000)
    ap.add_argument("--reservations", type=int, default=5000)
    ap.add_argument("--sim-place", type=int, default=2000, help="jobs the timed scheduling passes place")
    a = ap.parse_args()
    if a.reservations > a.sim_jobs:
        ap.error(f"--reservations ({a.reservations}) must not exceed --sim-jobs ({a.sim_jobs})")
    if a.sim_workers < max(SIM_SIZES):
        ap.error(f"--sim-workers ({a.sim_workers}) must hold the largest gang ({max(SIM_SIZES)})")
    tmp = tempfile.mkdtemp(prefix="gangway-load-")
    log(f"{os.cpu_count()} CPUs; scratch {tmp}")
    started = time.perf_counter()
    rows: list[str] = []
    try:
        if a.part in ("both", "real"):
            for _ in range(a.repeats):
                for aof in a.redis_appendfsync.split(","):
                    rows += real_part(a, tmp, aof)
        if a.part in ("both", "sim"):
            rows += sim_part(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parts = []
    if a.part in ("both", "real"):
        parts.append(f"real: {a.producers} producer processes x {a.jobs_per_producer} one-worker XGBoost jobs "
                     f"({a.rows:,} rows, {a.rounds} rounds) on {a.workers} workers")
    if a.part in ("both", "sim"):
        parts.append(f"sim: {a.sim_workers:,} registered workers, {a.sim_jobs:,} pending jobs, gang sizes "
                     f"{sorted(set(SIM_SIZES))}")
    redis_version = subprocess.run([services.redis_binary(), "--version"], capture_output=True, text=True).stdout
    print_table("; ".join(parts) + f"; {os.cpu_count()} CPUs; {redis_version.split(' sha')[0].strip()} "
                f"({services.redis_binary()}); total {time.perf_counter() - started:.0f} s", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
