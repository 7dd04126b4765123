#!/usr/bin/env python
"""Gangway overhead benchmark: an embedded fleet against a hand-launched XGBoost collective.

    python bench/overhead.py [--rows N] [--rounds R] [--small-jobs K] [--gap S]

Starts its own fleet (2 workers, temp home, free ports), measures end-to-end ``fit`` against
two hand-launched rabit processes on local .npy files, native single-process ``xgb.train``,
submit -> training latency, shard fetch throughput and training-child peak RSS, and prints a
markdown table. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing, contextmanager

import numpy as np
import psutil
import pyarrow as pa
import xgboost as xgb

from common.datasets import ChunkCache, DatasetReader, join_cache_writers, read_manifest
from common.manifest import assign_shard, shard_bounds
from common.settings import Settings
from common.state import State, connect
from common.store import S3Store, parse_s3_uri
from workers.local import services
from workers.local.fleet import Fleet

FEATURES = [f"f{i}" for i in range(28)]
LABEL = "label"
PARAMS = {"objective": "binary:logistic", "max_depth": 6, "max_bin": 256, "tree_method": "hist"}

# One rank of the hand-launched baseline: load its half, join the collective, train like a gangway rank.
BASELINE_RANK = """
import json, sys, numpy as np, xgboost as xgb
folder, rank, host, port, rounds, params = sys.argv[1:7]
rank, params = int(rank), json.loads(params)
X, y = np.load(f"{folder}/X{rank}.npy"), np.load(f"{folder}/y{rank}.npy")
with xgb.collective.CommunicatorContext(dmlc_communicator="rabit", dmlc_tracker_uri=host,
                                        dmlc_tracker_port=int(port), dmlc_task_id=f"{rank:06d}"):
    dtrain = xgb.QuantileDMatrix(X, label=y, max_bin=256)
    xgb.train(params, dtrain, num_boost_round=int(rounds), verbose_eval=False)
"""


# data ------------------------------------------------------------------------------------------
def make_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HIGGS-shaped: 28 float32 features, a binary label from a nonlinear function plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, 28), dtype=np.float32)
    z = (np.sin(2 * X[:, 0]) * X[:, 1] + X[:, 2] ** 2 - np.abs(X[:, 3]) + X[:, 4] * X[:, 5]
         + np.tanh(X[:, 6] + X[:, 7]) + 0.3 * X[:, 8:28].sum(axis=1) / np.sqrt(20))
    y = (z + 0.5 * rng.standard_normal(rows, dtype=np.float32) > np.median(z)).astype(np.float32)
    return X, y


def to_arrow(X: np.ndarray, y: np.ndarray) -> pa.Table:
    cols = {name: pa.array(np.ascontiguousarray(X[:, i])) for i, name in enumerate(FEATURES)}
    return pa.table({**cols, LABEL: pa.array(y)})


def write_halves(X: np.ndarray, y: np.ndarray, folder: str) -> None:
    """The same row-balanced contiguous halves a 2-rank gangway job gets."""
    for rank in range(2):
        lo, hi = shard_bounds(len(y), 2, rank)
        np.save(f"{folder}/X{rank}.npy", np.ascontiguousarray(X[lo:hi]))
        np.save(f"{folder}/y{rank}.npy", y[lo:hi])


# fleet -----------------------------------------------------------------------------------------
def bindable(port: int) -> bool:
    with closing(socket.socket()) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block(n: int) -> int:
    """First port of ``n`` consecutive free ports (worker i of the fleet gets the i-th block of 10)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        if all(bindable(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no block of {n} free ports found")


@contextmanager
def embedded_fleet(home: str, zygote: bool = True):
    """A 2-worker embedded fleet on free ports, this process's producer pointed at it; stopped on exit."""
    base = free_port_block(20)
    settings = Settings.from_env({}, home=home, broker_url=f"redis://127.0.0.1:{services.free_port()}/0",
                                 s3_endpoint=f"http://127.0.0.1:{services.free_port()}",
                                 worker_ports=f"{base}-{base + 9}", zygote=zygote)
    os.environ.update(settings.as_env())   # Client.default() reads GANGWAY_* from the environment
    log("starting the embedded fleet (2 workers)")
    fleet = Fleet(settings, workers=2)
    fleet.start()
    try:
        yield fleet
    finally:
        log("stopping the fleet")
        fleet.stop()


def estimator(rounds: int):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    return XGBEstimator(n_estimators=rounds, params=dict(PARAMS),
                        scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))


def timed_fit(connector, rounds: int) -> tuple[float, object]:
    est = estimator(rounds)
    t0 = time.perf_counter()
    est.fit(connector, input_cols=FEATURES, label_col=LABEL)
    return time.perf_counter() - t0, est.last_job


def uploaded_bytes(job) -> int:
    return int(job.client.state.spec(job.job_id).datasets["train"].get("uploaded_bytes") or 0)


# baselines -------------------------------------------------------------------------------------
def hand_launched(folder: str, rounds: int) -> float:
    """Two rabit processes on local files: seconds from launch to both exits."""
    from xgboost.tracker import RabitTracker
    tracker = RabitTracker(n_workers=2, host_ip="127.0.0.1", sortby="task", timeout=600)
    tracker.start()
    args = tracker.worker_args()
    params = json.dumps({**PARAMS, "nthread": 1})
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", BASELINE_RANK, folder, str(rank),
                               str(args["dmlc_tracker_uri"]), str(args["dmlc_tracker_port"]), str(rounds),
                               params], stdout=subprocess.DEVNULL) for rank in range(2)]
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - t0
    tracker.wait_for(60)
    if any(codes):
        raise RuntimeError(f"baseline ranks exited with {codes}")
    return elapsed


# One rank of a hand-launched LightGBM network: its half from local files, the caller's params, the socket
# network on two free ports, no per-round evaluation (as a gangway rank without verbose_eval).
LGB_BASELINE_RANK = """
import json, sys, numpy as np, lightgbm as lgb
folder, rank, machines, rounds, params = sys.argv[1:6]
rank, params = int(rank), json.loads(params)
X, y = np.load(f"{folder}/X{rank}.npy"), np.load(f"{folder}/y{rank}.npy")
ports = [int(m.rsplit(":", 1)[1]) for m in machines.split(",")]
d = lgb.Dataset(X, label=y, free_raw_data=True)
lgb.train({**params, "num_threads": 1, "tree_learner": "data", "machines": machines, "num_machines": 2,
           "local_listen_port": ports[rank], "pre_partition": True}, d, num_boost_round=int(rounds))
"""


def lgb_hand_launched(folder: str, rounds: int, params: dict) -> float:
    """Two LightGBM processes on local files, no queue or store: seconds from launch to both exits."""
    machines = ",".join(f"127.0.0.1:{services.free_port()}" for _ in range(2))
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", LGB_BASELINE_RANK, folder, str(rank), machines, str(rounds),
                               json.dumps(params)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for rank in range(2)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"hand-launched LightGBM ranks exited with {codes}")
    return time.perf_counter() - t0


def native(X: np.ndarray, y: np.ndarray, rounds: int) -> float:
    """One process, nthread=2, QuantileDMatrix built and trained in the timing."""
    t0 = time.perf_counter()
    dtrain = xgb.QuantileDMatrix(X, label=y, max_bin=256, nthread=2)
    xgb.train({**PARAMS, "nthread": 2}, dtrain, num_boost_round=rounds, verbose_eval=False)
    return time.perf_counter() - t0


# latency, fetch, memory ------------------------------------------------------------------------
STAGES = ("submitted -> persisted", "persisted -> placed", "placed -> ranks fetching",
          "fetching -> waiting (child prepare)", "waiting -> training (barrier)")


def submit_latencies(fleet: Fleet, uri: str, k: int, gap: float) -> tuple[list[float], list[list[float]]]:
    """max over ranks of t_training - submitted_at, one small job at a time; plus its stages."""
    from producer.connectors import DataConnector
    state = State(connect(fleet.settings))
    total, stages = [], []
    for _ in range(k):
        time.sleep(gap)   # let each worker refill its standby training child: a "warm fleet"
        job = estimator(5).submit(DataConnector.from_uri(uri), input_cols=FEATURES, label_col=LABEL)
        job.wait(timeout=120)
        rec, ranks = state.job(job.job_id), state.ranks(job.job_id).values()
        marks = [float(rec["submitted_at"]), float(rec["persisted_at"]), float(rec["started_at"]),
                 *(max(r[t] for r in ranks) for t in ("t_fetching", "t_waiting", "t_training"))]
        total.append(marks[-1] - marks[0])
        stages.append([b - a for a, b in zip(marks, marks[1:])])
    return total, stages


def fetch_ratio(settings: Settings, uri: str, tmp: str) -> tuple[float, float, int]:
    """Best-of-2 seconds of DatasetReader (empty cache) and of raw sequential get_object, same keys."""
    store = S3Store(settings)
    manifest = read_manifest(store, uri)
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/"
    chunks = [manifest.chunks[s.chunk] for s in assign_shard([c.rows for c in manifest.chunks], 2, 0)]
    nbytes = sum(c.nbytes for c in chunks)

    def raw() -> float:
        t0 = time.perf_counter()
        for c in chunks:
            store.get(bucket, manifest.object_key(prefix, c))
        return time.perf_counter() - t0

    def reader(i: int) -> float:
        cache = ChunkCache(tempfile.mkdtemp(prefix=f"cache{i}-", dir=tmp), 16 * 1024**3)
        t0 = time.perf_counter()
        # As a rank reads: into memory, checksummed, the cache file written behind.
        DatasetReader(store, cache, threads=settings.fetch_threads, write_behind=True).read(
            uri, manifest, world_size=2, rank=0)
        took = time.perf_counter() - t0
        join_cache_writers()
        return took

    best = [min(pair) for pair in zip(*[(reader(i), raw()) for i in range(3)])]
    return best[0], best[1], nbytes


class RssSampler:
    """Peak RSS of the fleet's training processes, every 50 ms: the zygote and the children it forked
    (``python -m workers.runtime.zygote``), or with GANGWAY_ZYGOTE=0 ``python -m workers.runtime.child``."""

    def __init__(self, fleet: Fleet) -> None:
        self.roots = [psutil.Process(s.proc.pid) for s in fleet.started if s.name.startswith("worker-")]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        rss = 0
        for p in (c for root in self.roots for c in root.children(recursive=True)):
            try:
                cmd = " ".join(p.cmdline())
                if "workers.runtime.child" in cmd or "workers.runtime.zygote" in cmd:
                    rss = max(rss, p.memory_info().rss)
            except psutil.Error:   # exited between listing and reading
                pass
        return rss

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# run and report --------------------------------------------------------------------------------
def measure(fleet: Fleet, X: np.ndarray, y: np.ndarray, a: argparse.Namespace, tmp: str) -> dict:
    """Every measurement, in an order that keeps the fleet warm for the timed fits."""
    from producer.connectors import DataConnector
    m: dict = {}
    log("upload fit (warms the fleet, puts the dataset in the store)")
    _, job = timed_fit(DataConnector.from_arrow(to_arrow(X, y)), a.rounds)
    uri = job.client.state.spec(job.job_id).datasets["train"]["uri"]
    log("hand-launched 2-process baseline")
    m["base"] = hand_launched(tmp, a.rounds)

    log("warm fit (DataConnector.from_uri), sampling training-child RSS")
    sampler = RssSampler(fleet)
    m["idle_rss"] = sampler.sample()
    with sampler:
        m["warm"], job = timed_fit(DataConnector.from_uri(uri), a.rounds)
    m["peak_rss"] = sampler.peak
    assert uploaded_bytes(job) == 0, "the warm fit uploaded data"
    log("native single-process xgb.train, nthread=2")
    m["native"] = native(X, y, a.rounds)

    log("cold fit (fresh data hash, upload included)")
    cold_table = to_arrow(*make_data(a.rows, seed=2))
    m["cold"], job = timed_fit(DataConnector.from_arrow(cold_table), a.rounds)
    assert uploaded_bytes(job) > 0, "the cold fit found its data already stored"
    del cold_table
    log("shard fetch: DatasetReader (empty cache) vs raw sequential get_object")
    time.sleep(a.gap + 2)   # let the workers' standby children finish warming up first
    m["read"], m["raw"], m["shard_bytes"] = fetch_ratio(fleet.settings, uri, tmp)

    log(f"{a.small_jobs} small jobs (2,000 rows, 5 rounds), {a.gap:g}s apart")
    _, job = timed_fit(DataConnector.from_arrow(to_arrow(*make_data(2000, seed=3))), 5)
    small_uri = job.client.state.spec(job.job_id).datasets["train"]["uri"]
    m["lat"], m["stages"] = submit_latencies(fleet, small_uri, a.small_jobs, a.gap)
    return m


def row(metric: str, measured: str, target: str = "", ok: bool | None = None) -> str:
    verdict = "info" if ok is None else ("pass" if ok else "FAIL")
    return f"| {metric} | {measured} | {target or '-'} | {verdict} |"


def report(m: dict, rows: int) -> list[str]:
    mb, shard_mem = 1024**2, (rows // 2) * 29 * 4
    warm, cold, fetch = m["warm"] / m["base"], m["cold"] / m["base"], m["raw"] / m["read"]
    p50, p99 = (float(np.percentile(m["lat"], q)) for q in (50, 99))
    rss = m["peak_rss"] / shard_mem
    rss_data = (m["peak_rss"] - m["idle_rss"]) / shard_mem
    return [
        row("hand-launched 2-rank baseline (s)", f"{m['base']:.2f}"),
        row("gangway warm fit, data in store (s)", f"{m['warm']:.2f}"),
        row("gangway cold fit, upload included (s)", f"{m['cold']:.2f}"),
        row("native xgb.train, 1 process, nthread=2 (s)", f"{m['native']:.2f}"),
        row("warm fit / hand-launched", f"{warm:.3f}", "<= 1.05", warm <= 1.05),
        row("cold fit / hand-launched", f"{cold:.3f}", "<= 1.20", cold <= 1.20),
        row("warm fit / native", f"{m['warm'] / m['native']:.3f}"),
        row(f"submit -> all ranks training, p50 of {len(m['lat'])}", f"{p50 * 1000:.0f} ms", "<= 300 ms",
            p50 <= 0.3),
        row(f"submit -> all ranks training, p99 of {len(m['lat'])}", f"{p99 * 1000:.0f} ms", "<= 1000 ms",
            p99 <= 1.0),
        *(row(f"stage p50: {name}", f"{np.percentile([st[i] for st in m['stages']], 50) * 1000:.0f} ms")
          for i, name in enumerate(STAGES)),
        row("shard fetch, DatasetReader, empty cache (MB/s)", f"{m['shard_bytes'] / mb / m['read']:.0f}"),
        row("shard fetch, raw sequential get_object (MB/s)", f"{m['shard_bytes'] / mb / m['raw']:.0f}"),
        row("shard fetch, reader / raw", f"{fetch:.2f}", ">= 0.8", fetch >= 0.8),
        row("training process RSS, idle zygote or standby (MiB)", f"{m['idle_rss'] / mb:.0f}"),
        row("training child peak RSS (MiB)", f"{m['peak_rss'] / mb:.0f}"),
        row("shard in memory, rows/2 x 29 x 4 B (MiB)", f"{shard_mem / mb:.1f}"),
        row("peak RSS / shard", f"{rss:.2f}"),
        row("(peak RSS - idle standby RSS) / shard", f"{rss_data:.2f}", "<= 2.5", rss_data <= 2.5),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--small-jobs", type=int, default=20)
    ap.add_argument("--gap", type=float, default=2.0, help="seconds of idle before each small job")
    ap.add_argument("--no-zygote", action="store_true",
                    help="spawned standby children (GANGWAY_ZYGOTE=0): a forked child's RSS starts below its "
                         "zygote's (library pages are faulted in lazily), so its floor is best measured this way")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gangway-bench-")
    log(f"generating {a.rows:,} x 28 rows; scratch {tmp}")
    X, y = make_data(a.rows, seed=1)
    write_halves(X, y, tmp)
    try:
        with embedded_fleet(os.path.join(tmp, "home"), zygote=not a.no_zygote) as fleet:
            m = measure(fleet, X, y, a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(f"{a.rows:,} rows x 28 float32 features, {a.rounds} rounds, max_depth 6, 2 workers x 1 thread; "
                f"{os.cpu_count()} CPUs; xgboost {xgb.__version__}", report(m, a.rows))
    return 0


def print_table(description: str, rows: list[str]) -> None:
    """The command line, what was measured, and the markdown table (stdout)."""
    print(f"command: `{shlex.join(['python', *sys.argv])}`\n")
    print(description + "\n")
    print("| metric | measured | target | pass/fail |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
