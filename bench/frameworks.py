#!/usr/bin/env python
"""Gangway framework benchmark: LightGBM, to_torch_dataset and PyTorch DDP against their native baselines.

    python bench/frameworks.py [--rows N] [--rounds R] [--steps S] [--repeat K]

Starts its own fleet (2 workers, temp home, free ports) and measures: a warm 2-worker
LightGBMEstimator fit against native single-process ``lgb.train`` (num_threads=2);
``to_torch_dataset`` rows/s against iterating the Arrow table in memory; and a 2-rank gloo
DDP run through PyTorchDistributor against the same loop launched by torchrun. Prints a
markdown table. See bench/README.md.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import lightgbm as lgb
import numpy as np
import psutil
import pyarrow as pa
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import FEATURES, LABEL, embedded_fleet, lgb_hand_launched, log, print_table, row
from peers import ddp_loop as peer_ddp_loop

from common.manifest import shard_bounds

LGB_PARAMS = {"objective": "regression", "num_leaves": 31, "verbose": -1}
BATCH = 1024
CHUNK_ROWS = 65536


# data ------------------------------------------------------------------------------------------
def make_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28 float32 features, a float32 regression target: a nonlinear function plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, 28), dtype=np.float32)
    z = (np.sin(2 * X[:, 0]) * X[:, 1] + X[:, 2] ** 2 - np.abs(X[:, 3]) + X[:, 4] * X[:, 5]
         + np.tanh(X[:, 6] + X[:, 7]) + 0.3 * X[:, 8:28].sum(axis=1) / np.sqrt(20))
    return X, (z + 0.5 * rng.standard_normal(rows, dtype=np.float32)).astype(np.float32)


def chunked_table(X: np.ndarray, y: np.ndarray, chunk: int = CHUNK_ROWS) -> pa.Table:
    """One record batch per ``chunk`` rows, each with its own buffers, as a fetched dataset has."""
    batches = []
    for lo in range(0, len(y), chunk):
        hi = min(lo + chunk, len(y))
        cols = [pa.array(np.ascontiguousarray(X[lo:hi, i])) for i in range(X.shape[1])]
        batches.append(pa.record_batch([*cols, pa.array(y[lo:hi].copy())], names=[*FEATURES, LABEL]))
    return pa.Table.from_batches(batches)


def write_halves(X: np.ndarray, y: np.ndarray, folder: str) -> None:
    """The same row-balanced contiguous halves a 2-rank gangway job gets from a sharded connector."""
    for rank in range(2):
        lo, hi = shard_bounds(len(y), 2, rank)
        np.save(f"{folder}/X{rank}.npy", np.ascontiguousarray(X[lo:hi]))
        np.save(f"{folder}/y{rank}.npy", y[lo:hi])


# LightGBM --------------------------------------------------------------------------------------
def phases(job) -> dict:
    """From the job's rank records: submit -> all ranks training, and the ranks' own train_seconds (max)."""
    ranks = job.client.state.ranks(job.job_id).values()
    submitted = float(job.client.state.job(job.job_id)["submitted_at"])
    return {"to_training": max(float(r["t_training"]) for r in ranks) - submitted,
            "rank_train": max(float((r.get("summary") or {}).get("train_seconds", "nan")) for r in ranks)}


def lgb_fit(connector, rounds: int) -> tuple[float, object]:
    from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
    est = LightGBMEstimator(n_estimators=rounds, params=dict(LGB_PARAMS),
                            scaling_config=LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1))
    t0 = time.perf_counter()
    est.fit(connector, input_cols=FEATURES, label_col=LABEL)
    return time.perf_counter() - t0, est.last_job


def lgb_native(X: np.ndarray, y: np.ndarray, rounds: int) -> float:
    """One process, num_threads=2, Dataset construction included; no valid sets (as a gangway rank)."""
    t0 = time.perf_counter()
    dtrain = lgb.Dataset(X, label=y, feature_name=FEATURES, free_raw_data=True)
    lgb.train({**LGB_PARAMS, "num_threads": 2}, dtrain, num_boost_round=rounds)
    return time.perf_counter() - t0


# to_torch_dataset ------------------------------------------------------------------------------
def touch(batch: dict) -> int:
    """Read one element of every tensor (the last row: its page must be there); return the row count."""
    acc = 0.0
    for t in batch.values():
        acc += float(t[-1])
    return len(t)


def torch_dataset_rate(table: pa.Table) -> float:
    from producer.connectors import DataConnector
    ds = DataConnector.from_arrow(table).to_torch_dataset(batch_size=BATCH)
    t0 = time.perf_counter()
    rows = sum(touch(b) for b in ds)
    return rows / (time.perf_counter() - t0)


def arrow_rate(table: pa.Table) -> float:
    t0 = time.perf_counter()
    rows = 0
    for rb in table.to_batches(max_chunksize=BATCH):
        rows += touch({n: torch.from_numpy(c.to_numpy()) for n, c in zip(rb.schema.names, rb.columns)})
    return rows / (time.perf_counter() - t0)


def loader_rates(table: pa.Table, repeat: int = 3) -> tuple[float, float]:
    """Best of ``repeat`` rows/s, to_torch_dataset then the in-memory Arrow iteration."""
    with warnings.catch_warnings():   # from_numpy on Arrow's read-only zero-copy arrays warns once
        warnings.simplefilter("ignore", UserWarning)
        return (max(torch_dataset_rate(table) for _ in range(repeat)),
                max(arrow_rate(table) for _ in range(repeat)))


# DDP -------------------------------------------------------------------------------------------
def ddp_loop(X, y, steps, batch):
    """What both launchers run: ``peers.ddp_loop`` (MLP 28->256->256->1, SGD, ``steps`` batches of ``batch``
    rows of this rank's half), timed from its first step to its last."""
    import torch.distributed as dist
    out = peer_ddp_loop(X, y, steps, batch)
    dist.destroy_process_group()
    return {"after_first_step_s": out["t_end"] - out["t_first"], "torch_threads": out["threads"],
            "last_loss": out["last_loss"]}


def gangway_train():
    """The PyTorchDistributor train_func: this rank's shard to numpy, then ``ddp_loop``."""
    import numpy as np

    from producer.pytorch import get_context
    ctx = get_context()
    hp = ctx.get_hyper_params()
    table = ctx.get_dataset_map()["train"].get_shard().to_arrow()
    X = np.column_stack([table.column(c).to_numpy() for c in hp["features"]]).astype(np.float32, copy=False)
    y = table.column(hp["label"]).to_numpy()
    metrics = ddp_loop(X, y, hp["steps"], hp["batch"])
    if ctx.get_rank() == 0:
        ctx.get_metrics_reporter().log_metrics(metrics)


TORCHRUN_MAIN = """
import json, os, sys, numpy as np
folder, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rank = int(os.environ["RANK"])
metrics = ddp_loop(np.load(f"{folder}/X{rank}.npy"), np.load(f"{folder}/y{rank}.npy"), steps, batch)
if rank == 0:
    with open(f"{folder}/torchrun-metrics.json", "w") as f:
        json.dump(metrics, f)
"""


def ddp_gangway(uri: str, steps: int) -> dict:
    from producer.connectors import ShardedDataConnector
    from producer.pytorch import (
        PyTorchDistributor,
        PyTorchScalingConfig,
        WorkerResourceConfig,
    )
    dist = PyTorchDistributor(gangway_train, PyTorchScalingConfig(
        num_nodes=1, num_workers_per_node=2,
        resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1, num_gpus=0)))
    hp = {"steps": steps, "batch": BATCH, "features": FEATURES, "label": LABEL}
    t0 = time.perf_counter()
    job = dist.submit(dataset_map={"train": ShardedDataConnector.from_uri(uri)}, hyper_params=hp)
    result = job.wait(timeout=3600)
    wall = time.perf_counter() - t0
    return {**result.get_metrics(), "wall": wall, **phases(job)}


def ddp_torchrun(folder: str, steps: int) -> dict:
    """``torchrun --standalone --nproc-per-node 2`` on a script holding ``ddp_loop``'s source; launch to exit."""
    script = os.path.join(folder, "ddp_torchrun.py")
    with open(script, "w") as f:
        f.write(inspect.getsource(peer_ddp_loop).replace("def ddp_loop(", "def peer_ddp_loop(")
                + inspect.getsource(ddp_loop) + TORCHRUN_MAIN)
    cmd = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc-per-node", "2", script, folder,
           str(steps), str(BATCH)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"torchrun exited with {proc.returncode}: {proc.stderr[-2000:]}")
    with open(os.path.join(folder, "torchrun-metrics.json")) as f:
        return {**json.load(f), "wall": wall}


# run and report --------------------------------------------------------------------------------
def settle(limit: float = 30.0) -> None:
    """Wait (at most ``limit`` s) for the host to go idle: the workers refill standby children after a job."""
    deadline = time.monotonic() + limit
    while psutil.cpu_percent(interval=0.5) > 20 and time.monotonic() < deadline:
        pass


def measure(X: np.ndarray, y: np.ndarray, table: pa.Table, a: argparse.Namespace, tmp: str) -> dict:
    """Each timed pair ``--repeat`` times, alternating, the host idle before each; the best run of each kind."""
    from producer.connectors import DataConnector
    log("LightGBM upload fit (warms the fleet, puts the dataset in the store)")
    _, job = lgb_fit(DataConnector.from_arrow(table), a.rounds)
    uri = job.client.state.spec(job.job_id).datasets["train"]["uri"]
    warm, native, hand, gw, tr = [], [], [], [], []
    for i in range(a.repeat):
        log(f"[{i + 1}/{a.repeat}] LightGBM warm fit (DataConnector.from_uri), then native lgb.train")
        settle()
        seconds, job = lgb_fit(DataConnector.from_uri(uri), a.rounds)
        warm.append((seconds, phases(job)))
        settle()
        native.append(lgb_native(X, y, a.rounds))
        settle()
        hand.append(lgb_hand_launched(tmp, a.rounds, LGB_PARAMS))
    for i in range(a.repeat):
        log(f"[{i + 1}/{a.repeat}] DDP, {a.steps} steps: 2 gloo ranks through gangway, then torchrun")
        settle()
        gw.append(ddp_gangway(uri, a.steps))
        settle()
        tr.append(ddp_torchrun(tmp, a.steps))
    lgb_warm, lgb_phases = min(warm, key=lambda r: r[0])
    return {"lgb_warm": lgb_warm, "lgb_phases": lgb_phases, "lgb_native": min(native), "lgb_hand": min(hand),
            "ddp_gw": min(gw, key=lambda r: r["after_first_step_s"]),
            "ddp_tr": min(tr, key=lambda r: r["after_first_step_s"])}


def report(m: dict, steps: int) -> list[str]:
    lg = m["lgb_warm"] / m["lgb_native"]
    ld = m["loader_gw"] / m["loader_arrow"]
    gw, tr = m["ddp_gw"], m["ddp_tr"]
    dd = gw["after_first_step_s"] / tr["after_first_step_s"]
    return [
        row("LightGBM: gangway warm fit, 2 workers x 1 thread (s)", f"{m['lgb_warm']:.2f}"),
        row("LightGBM: native lgb.train, 1 process, num_threads=2 (s)", f"{m['lgb_native']:.2f}"),
        row("LightGBM: hand-launched 2 processes x 1 thread, local files (s)", f"{m['lgb_hand']:.2f}"),
        row("LightGBM: gangway / native", f"{lg:.3f}", "<= 1.25", lg <= 1.25),
        row("LightGBM: gangway / hand-launched (gangway's own cost)", f"{m['lgb_warm'] / m['lgb_hand']:.3f}"),
        row("LightGBM: hand-launched / native (LightGBM's data-parallel cost)",
            f"{m['lgb_hand'] / m['lgb_native']:.3f}"),
        row("LightGBM gangway: submit -> all ranks training (s)", f"{m['lgb_phases']['to_training']:.2f}"),
        row("LightGBM gangway: Dataset + lgb.train in the ranks, max (s)", f"{m['lgb_phases']['rank_train']:.2f}"),
        row(f"to_torch_dataset, batch {BATCH} (rows/s)", f"{m['loader_gw']:,.0f}"),
        row(f"Arrow to_batches({BATCH}) + torch.from_numpy (rows/s)", f"{m['loader_arrow']:,.0f}"),
        row("to_torch_dataset / in-memory Arrow", f"{ld:.3f}", ">= 0.8", ld >= 0.8),
        row(f"DDP gangway: first step -> step {steps} end, rank 0 (s)", f"{gw['after_first_step_s']:.2f}"),
        row(f"DDP torchrun: first step -> step {steps} end, rank 0 (s)", f"{tr['after_first_step_s']:.2f}"),
        row("DDP after first step: gangway / torchrun", f"{dd:.3f}", "<= 1.10", dd <= 1.10),
        row("DDP gangway: submit -> result (s)", f"{gw['wall']:.2f}"),
        row("DDP gangway: submit -> all ranks training (s)", f"{gw['to_training']:.2f}"),
        row("DDP gangway: train_func in the ranks, max (s)", f"{gw['rank_train']:.2f}"),
        row("DDP torchrun: launch -> exit (s)", f"{tr['wall']:.2f}"),
        row("DDP torch threads per rank, gangway / torchrun", f"{gw['torch_threads']} / {tr['torch_threads']}"),
        row("DDP last loss, gangway / torchrun", f"{gw['last_loss']:.4f} / {tr['last_loss']:.4f}"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300, help="DDP optimizer steps per rank")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each kind; the best is reported")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gangway-bench-fw-")
    log(f"generating {a.rows:,} x 28 rows in {CHUNK_ROWS:,}-row chunks; scratch {tmp}")
    X, y = make_data(a.rows, seed=1)
    table = chunked_table(X, y)
    write_halves(X, y, tmp)
    try:
        log("to_torch_dataset vs in-memory Arrow iteration (no fleet running)")
        loader_gw, loader_arrow = loader_rates(table, a.repeat)
        with embedded_fleet(os.path.join(tmp, "home")):
            m = {**measure(X, y, table, a, tmp), "loader_gw": loader_gw, "loader_arrow": loader_arrow}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(f"{a.rows:,} rows x 28 float32 features + float32 target; LightGBM {a.rounds} rounds, "
                f"num_leaves 31; DDP MLP 28-256-256-1, batch {BATCH}, {a.steps} steps, gloo; {os.cpu_count()} "
                f"CPUs; lightgbm {lgb.__version__}, torch {torch.__version__}; best of {a.repeat} runs each",
                report(m, a.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
