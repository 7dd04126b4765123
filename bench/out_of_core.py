#!/usr/bin/env python
"""Out-of-core benchmark: a parquet dataset streamed to the store and trained by 2 workers on a budget.

    python bench/out_of_core.py [--files 8] [--rows-per-file 300000] [--worker-memory 768MiB] [--rounds 20]
                               [--extra-features 0] [--skip-in-core] [--producer-only]
                               [--framework xgboost|lightgbm]

Generates HIGGS-shaped parquet files (28 float32 features + label), starts a bare S3 server,
and measures in one run: the producer's peak RSS for a quarter of the files and for all of them (a subprocess
each, VmHWM), upload MB/s against raw PUTs of the same bytes to the same store, then XGBoost
(or LightGBM) on a 2-worker fleet with ``GANGWAY_WORKER_MEMORY`` (auto: out of core when the shard does not
fit) and on a fleet with ``GANGWAY_OUT_OF_CORE=never`` (in core): each worker tree's peak memory,
training time and holdout logloss. Prints a markdown table (stdout); progress on stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import FEATURES, LABEL, free_port_block, log, make_data, print_table, row

from common.settings import Settings, parse_size
from common.store import S3Store
from workers.local import services
from workers.local.fleet import Fleet
from workers.runtime.memory import tree_memory, tree_rss

MiB = 1024 ** 2
PARAMS = {"objective": "binary:logistic", "max_depth": 6, "max_bin": 256, "eval_metric": "logloss"}
LGB_PARAMS = {"num_leaves": 31, "max_depth": 6, "max_bin": 255, "metric": "binary_logloss"}

PRODUCER = """
import json, sys, time
from common.settings import Settings
from common.store import S3Store
from producer import DataConnector

def peak():   # VmHWM: ru_maxrss would keep the forking parent's peak across exec
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024

settings = Settings.from_env()
store = S3Store(settings)
idle, t0 = peak(), time.perf_counter()
w = DataConnector.from_parquet(sys.argv[1:]).materialise(store, settings)
print(json.dumps({"uri": w.uri, "nbytes": w.manifest.nbytes, "rows": w.manifest.num_rows, "uploaded": w.uploaded_bytes,
                  "seconds": time.perf_counter() - t0, "idle": idle, "peak": peak()}))
"""


def feature_names(extra: int) -> list[str]:
    """HIGGS' 28 features, then ``extra`` noise columns (wide rows: more bytes a row, same label)."""
    return FEATURES + [f"noise{i}" for i in range(extra)]


def generate(folder: str, files: int, rows: int, extra: int = 0) -> list[str]:
    paths = []
    for i in range(files):
        X, y = make_data(rows, seed=1000 + i)
        noise = np.random.default_rng(5000 + i).standard_normal((rows, extra), dtype=np.float32)
        table = pa.table({**{f: X[:, j] for j, f in enumerate(FEATURES)},
                          **{f"noise{j}": noise[:, j] for j in range(extra)}, LABEL: y})
        del X, noise
        paths.append(os.path.join(folder, f"part-{i:03d}.parquet"))
        pq.write_table(table, paths[-1], row_group_size=65536)
        log(f"wrote {paths[-1]} ({rows:,} rows)")
    return paths


def produce(settings: Settings, paths: list[str]) -> dict:
    env = {**os.environ, **settings.as_env()}
    out = subprocess.run([sys.executable, "-c", PRODUCER, *paths], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def raw_put_mb_s(settings: Settings, total: int, chunk: int) -> float:
    """PUTs of ``total`` random bytes in ``chunk``-sized objects, fetch_threads at a time."""
    store = S3Store(settings)
    store.ensure_bucket("raw-put-bench")
    payload = os.urandom(chunk)
    n = max(1, total // chunk)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(settings.fetch_threads) as pool:
        list(pool.map(lambda i: store.put("raw-put-bench", f"raw/{i}", payload), range(n)))
    return n * chunk / 1e6 / (time.perf_counter() - t0)


class TreeSampler:
    """Peak memory of each worker's whole process tree (Celery, zygote, standby and training children):
    what the plan's "in use" counts (``workers.runtime.memory.tree_memory``: forked pages once), and summed
    RSS beside it (every shared page once per process)."""

    def __init__(self, fleet: Fleet) -> None:
        self.roots = {s.name: s.proc.pid for s in fleet.started if s.name.startswith("worker-")}
        self.peaks = dict.fromkeys(self.roots, 0)
        self.rss_peaks = dict.fromkeys(self.roots, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self, pid: int) -> tuple[int, int]:
        try:
            root = psutil.Process(pid)
            pids = [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return 0, 0
        return tree_memory(pids), tree_rss(pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.roots.items():
                held, rss = self._tree(pid)
                self.peaks[name] = max(self.peaks[name], held)
                self.rss_peaks[name] = max(self.rss_peaks[name], rss)
            time.sleep(0.1)

    def __enter__(self) -> TreeSampler:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def fleet_settings(base: Settings, home: str, **extra) -> Settings:
    ports = free_port_block(20)
    return base.replace(home=home, broker_url=f"redis://127.0.0.1:{services.free_port()}/0",
                        worker_ports=f"{ports}-{ports + 9}", **extra)


def estimator(framework: str, rounds: int, workers: int):
    """The user's estimator; its logloss metric's name in ``get_eval_results()``."""
    if framework == "lightgbm":
        from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
        return LightGBMEstimator(n_estimators=rounds, objective="binary", params=dict(LGB_PARAMS),
                                 scaling_config=LightGBMScalingConfig(num_workers=workers)), "binary_logloss"
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    return XGBEstimator(n_estimators=rounds, params=dict(PARAMS),
                        scaling_config=XGBScalingConfig(num_workers=workers)), "logloss"


def train(settings: Settings, uri: str, holdout_uri: str, rounds: int, workers: int = 2, extra: int = 0,
          framework: str = "xgboost") -> dict:
    """One ``workers``-worker fit on a fresh fleet against the shared S3; what the ranks and the sampler saw."""
    from producer import DataConnector
    os.environ.update(settings.as_env())
    fleet = Fleet(settings, workers=workers)
    fleet.start()
    try:
        est, metric = estimator(framework, rounds, workers)
        with TreeSampler(fleet) as sampler:
            t0 = time.perf_counter()
            job = est.submit(DataConnector.from_uri(uri), feature_names(extra), LABEL, eval_set=DataConnector.from_uri(holdout_uri))
            job.wait()
            wall = time.perf_counter() - t0
        ranks = job.status().ranks
        return {"wall": wall, "peaks": sampler.peaks, "rss_peaks": sampler.rss_peaks, "logloss": est.get_eval_results()["eval"][metric][-1],
                "modes": sorted({r.get("fetch", {}).get("memory", {}).get("mode") for r in ranks.values()}),
                "in_use": [r.get("fetch", {}).get("memory", {}).get("in_use", 0) for r in ranks.values()],
                "planned": [r.get("fetch", {}).get("memory", {}).get("external_need", 0) for r in ranks.values()],
                "planned_in_core": [r.get("fetch", {}).get("memory", {}).get("in_core_need", 0) for r in ranks.values()],
                "train": max(r["summary"].get("dmatrix_seconds", 0) + r["summary"].get("train_seconds", 0)
                             for r in ranks.values())}
    finally:
        fleet.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--rows-per-file", type=int, default=300_000)
    p.add_argument("--worker-memory", default="768MiB")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--framework", choices=("xgboost", "lightgbm"), default="xgboost")
    p.add_argument("--producer-threads", type=int, default=None,
                   help="GANGWAY_FETCH_THREADS of the producer (its chunks in flight); default: the setting's")
    p.add_argument("--skip-in-core", action="store_true", help="no in-core comparison (a dataset too big for it)")
    p.add_argument("--extra-features", type=int, default=0,
                   help="noise float32 columns added to the 28 (wider rows: more data per row of XGBoost state)")
    p.add_argument("--producer-only", action="store_true", help="only the producer rows (no training)")
    p.add_argument("--upload-pairs", type=int, default=1,
                   help="upload all files (a fresh bucket each) then raw PUT the same bytes, this many times "
                        "alternating: the ratio row gives the median and spread (one pair is noisy on a busy box)")
    a = p.parse_args()
    home = tempfile.mkdtemp(prefix="gangway-ooc-")
    s3_port = services.free_port()
    base = Settings.from_env({}, home=home, s3_endpoint=f"http://127.0.0.1:{s3_port}")
    if a.producer_threads:
        base = base.replace(fetch_threads=a.producer_threads)
    os.makedirs(os.path.join(home, "s3"))
    s3 = subprocess.Popen(services.weed_command(s3_port, os.path.join(home, "s3")), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=services.weed_env(base.s3_access_key, base.s3_secret_key))
    try:
        m = run(a, base, home)
    finally:
        s3.terminate()
        try:
            s3.wait(timeout=20)
        except subprocess.TimeoutExpired:   # a weed mini busy flushing: the table still gets printed
            s3.kill()
            s3.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)
    report(a, m)
    return 0


def run(a: argparse.Namespace, base: Settings, home: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        try:
            S3Store(base).ensure_bucket(base.data_bucket)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    data = os.path.join(home, "parquet")
    os.makedirs(data)
    paths = generate(data, a.files + 1, a.rows_per_file, a.extra_features)
    train_paths, holdout = paths[:-1], paths[-1:]
    m: dict = {}
    log(f"producer: all {a.files} files")
    m["big"] = produce(base, train_paths)
    # A quarter of the files: still more chunks than the uploader keeps in flight (8 x 64K rows).
    m["small_files"] = max(1, a.files // 4)
    log(f"producer: {m['small_files']} files ({m['big']['uploaded'] / 1e6 / m['big']['seconds']:.0f} MB/s for all)")
    # Its own bucket: both runs must really upload (a chunk already pooled is skipped, which costs less).
    m["small"] = produce(base.replace(data_bucket="gangway-small"), train_paths[:m["small_files"]])
    m["holdout"] = produce(base, holdout)
    log("raw PUT throughput")
    chunk = min(base.chunk_bytes, m["big"]["nbytes"] // max(1, m["big"]["rows"] // base.chunk_rows))
    raw_total = min(m["big"]["nbytes"], 2 * 1024 * MiB)   # a throughput: 2 GiB say it
    m["raw_put"] = raw_put_mb_s(base, raw_total, chunk)
    m["pairs"] = [(m["big"]["uploaded"] / 1e6 / m["big"]["seconds"], m["raw_put"])]
    for i in range(1, a.upload_pairs):
        log(f"upload / raw PUT pair {i + 1} of {a.upload_pairs}")
        w = produce(base.replace(data_bucket=f"gangway-pair-{i}"), train_paths)
        m["pairs"].append((w["uploaded"] / 1e6 / w["seconds"], raw_put_mb_s(base, raw_total, chunk)))
    m["shard_mib"] = m["big"]["nbytes"] / a.workers / MiB
    if a.producer_only:
        return m
    log(f"training with GANGWAY_WORKER_MEMORY={a.worker_memory} (auto), {a.workers} workers")
    m["ooc"] = train(fleet_settings(base, os.path.join(home, "fleet-a"), worker_memory=a.worker_memory),
                     m["big"]["uri"], m["holdout"]["uri"], a.rounds, a.workers, a.extra_features, a.framework)
    if not a.skip_in_core:
        log("training in core (GANGWAY_OUT_OF_CORE=never, no budget)")
        m["inc"] = train(fleet_settings(base, os.path.join(home, "fleet-b"), out_of_core="never"),
                         m["big"]["uri"], m["holdout"]["uri"], a.rounds, a.workers, a.extra_features,
                         a.framework)
    return m


def report(a: argparse.Namespace, m: dict) -> None:
    budget = parse_size(a.worker_memory)
    big, small = m["big"], m["small"]
    upload = big["uploaded"] / 1e6 / big["seconds"]
    rows = [
        row("dataset (Arrow in memory)", f"{big['nbytes'] / MiB:,.0f} MiB, {big['rows']:,} rows x {29 + a.extra_features} float32"),
        row(f"producer peak RSS, {m['small_files']} / {a.files} files (MiB)",
            f"{small['peak'] / MiB:.0f} ({small['nbytes'] / MiB:.0f} MiB) / {big['peak'] / MiB:.0f} "
            f"({big['nbytes'] / MiB:.0f} MiB); idle {big['idle'] / MiB:.0f}", "<= 512, flat",
            big["peak"] <= 512 * MiB and big["peak"] - small["peak"] < 64 * MiB),
        row("upload MB/s / raw PUT MB/s", f"{upload:.0f} / {m['raw_put']:.0f} = {upload / m['raw_put']:.2f}", ">= 0.8",
            upload / m["raw_put"] >= 0.8),
    ]
    if len(m["pairs"]) > 1:
        ratios = sorted(u / r for u, r in m["pairs"])
        rows.append(row(f"  {len(ratios)} pairs alternating: median (min-max)",
                        f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}); "
                        + ", ".join(f"{u:.0f}/{r:.0f}" for u, r in m["pairs"]), ">= 0.8",
                        statistics.median(ratios) >= 0.8))
    if "ooc" in m:
        rows += training_rows(a, m, budget)
    print_table(f"{a.files} parquet files x {a.rows_per_file:,} rows (+1 holdout file), {a.framework} {a.rounds} rounds "
                f"max_depth 6, {a.workers} workers; producer threads {a.producer_threads or 'default'}; "
                f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 1024**3:.0f} GiB; "
                f"data sha {hashlib.sha256(big['uri'].encode()).hexdigest()[:8]}", rows)


def training_rows(a: argparse.Namespace, m: dict, budget: int) -> list[str]:
    ooc = m["ooc"]
    inc = m.get("inc") or {"peaks": {}, "train": float("nan"), "wall": float("nan"), "logloss": float("nan")}
    worst = max(ooc["peaks"].values())
    return [
        row(f"worker tree peak memory (forked pages once), budget {a.worker_memory} (MiB)",
            ", ".join(f"{v / MiB:.0f}" for v in ooc["peaks"].values()) + f" (mode: {'/'.join(ooc['modes'])}; "
            f"shard {m['shard_mib']:.0f} MiB)", "<= budget", worst <= budget),
        row("  summed RSS of the tree, peak (a shared page once per process) (MiB)",
            ", ".join(f"{v / MiB:.0f}" for v in ooc["rss_peaks"].values())),
        row("  plan: tree in use + out-of-core need (MiB)",
            ", ".join(f"{u / MiB:.0f} + {n / MiB:.0f}" for u, n in zip(ooc["in_use"], ooc["planned"]))),
        row("in-core worker tree peak memory (MiB)", ", ".join(f"{v / MiB:.0f}" for v in inc["peaks"].values())),
        row("  plan: tree in use + in-core need (MiB)",
            ", ".join(f"{u / MiB:.0f} + {n / MiB:.0f}" for u, n in zip(inc.get("in_use", []), inc.get("planned_in_core", [])))),
        row("matrix + training s, out of core / in core",
            f"{ooc['train']:.1f} / {inc['train']:.1f} = {ooc['train'] / inc['train']:.2f}x "
            f"(wall {ooc['wall']:.1f} / {inc['wall']:.1f})"),
        row("holdout logloss, out of core / in core", f"{ooc['logloss']:.5f} / {inc['logloss']:.5f}", "same within noise",
            abs(ooc["logloss"] - inc["logloss"]) <= 0.01 * inc["logloss"] if "inc" in m else None),
    ]


if __name__ == "__main__":
    sys.exit(main())
