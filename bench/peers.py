#!/usr/bin/env python
"""gangway against every peer, on the same data and machine, in one run.

    python bench/peers.py [--rows N] [--rounds R] [--steps S] [--repeat K] [--only xgb,lgb,ddp]

XGBoost (native, hand-launched collective, gangway cold and warm, xgboost.dask, Ray Train bare and with
RayTrainReportCallback), LightGBM (native, hand-launched, gangway, lightgbm.dask, Ray Train) and PyTorch
DDP (torchrun, gangway PyTorchDistributor, Ray Train TorchTrainer): every row ``--repeat`` times,
alternating (one round runs every row once, the order of the groups rotating from round to round), then
a markdown table of median and spread. A peer whose package is missing is skipped with a line saying so:
Ray and dask come with ``pip install -e '.[all,peers]'``. See bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import (
    FEATURES, LABEL, embedded_fleet, hand_launched, lgb_hand_launched, log, make_data, write_halves,
)
from overhead import PARAMS as XGB_PARAMS


LGB_PARAMS = {"objective": "binary", "num_leaves": 31, "max_depth": 6, "verbose": -1}
BATCH = 1024


def have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# XGBoost ---------------------------------------------------------------------------------------
def xgb_native(ctx) -> float:
    import xgboost as xgb
    t0 = time.perf_counter()
    dtrain = xgb.QuantileDMatrix(ctx.X, label=ctx.y, max_bin=256, nthread=2)
    xgb.train({**XGB_PARAMS, "nthread": 2}, dtrain, num_boost_round=ctx.rounds)
    return time.perf_counter() - t0


def xgb_hand(ctx) -> float:
    return hand_launched(ctx.tmp, ctx.rounds)   # overhead.BASELINE_RANK with XGB_PARAMS, nthread 1


def xgb_estimator(rounds: int):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    return XGBEstimator(n_estimators=rounds, params=dict(XGB_PARAMS),
                        scaling_config=XGBScalingConfig(num_workers=2, num_cpu_per_worker=1))


def gangway_fit(ctx, est, df: pd.DataFrame, kind: str) -> float:
    """The user's path: ``fit(DataConnector.from_dataframe(df))``; the job's timeline is kept for the report."""
    from producer.connectors import DataConnector
    t0 = time.perf_counter()
    est.fit(DataConnector.from_dataframe(df), input_cols=FEATURES, label_col=LABEL)
    elapsed = time.perf_counter() - t0
    ctx.timelines.setdefault(kind, []).append(timeline(est.last_job, time.time() - elapsed, time.time()))
    return elapsed


def xgb_gangway_cold(ctx) -> float:
    # A frame nobody uploaded yet: a new seed per run, so hashing and uploading are in the timing.
    ctx.cold_seed += 1
    X, y = make_data(ctx.rows, seed=1000 + ctx.cold_seed)
    df = frame(X, y)
    elapsed = gangway_fit(ctx, xgb_estimator(ctx.rounds), df, "xgb cold")
    return elapsed


def xgb_gangway_warm(ctx) -> float:
    return gangway_fit(ctx, xgb_estimator(ctx.rounds), ctx.df, "xgb warm")


def dask_arrays(ctx):
    import dask.array as da
    half = (ctx.rows + 1) // 2
    return da.from_array(ctx.X, chunks=(half, 28)), da.from_array(ctx.y, chunks=(half,))


def xgb_dask(ctx) -> float:
    import xgboost as xgb
    import xgboost.dask  # noqa: F401  (not imported by ``import xgboost``)
    t0 = time.perf_counter()
    X, y = dask_arrays(ctx)
    dtrain = xgb.dask.DaskQuantileDMatrix(ctx.dask, X, y, max_bin=256)
    xgb.dask.train(ctx.dask, {**XGB_PARAMS, "nthread": 1}, dtrain, num_boost_round=ctx.rounds)
    return time.perf_counter() - t0


def ray_xgb_loop(config: dict):
    import ray.train
    import xgboost as xgb
    df = ray.train.get_dataset_shard("train").materialize().to_pandas()
    dtrain = xgb.QuantileDMatrix(df[config["features"]], label=df[config["label"]], max_bin=256)
    callbacks = []
    if config["report"]:
        from ray.train.xgboost import RayTrainReportCallback
        callbacks.append(RayTrainReportCallback())
    xgb.train({**config["params"], "nthread": 1}, dtrain, num_boost_round=config["rounds"],
              evals=[(dtrain, "train")] if config["report"] else [], callbacks=callbacks)


def ray_scaling():
    from ray.train import ScalingConfig
    return ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})


def ray_run_config(ctx):
    from ray.train import RunConfig
    return RunConfig(storage_path=os.path.join(ctx.tmp, "ray_results"))


def xgb_ray(ctx, report: bool) -> float:
    import ray.data
    from ray.train.xgboost import XGBoostTrainer
    t0 = time.perf_counter()
    trainer = XGBoostTrainer(ray_xgb_loop, scaling_config=ray_scaling(), run_config=ray_run_config(ctx),
                             train_loop_config={"features": FEATURES, "label": LABEL, "params": XGB_PARAMS,
                                                "rounds": ctx.rounds, "report": report},
                             datasets={"train": ray.data.from_pandas(ctx.df)})
    trainer.fit()
    return time.perf_counter() - t0


# LightGBM --------------------------------------------------------------------------------------
def lgb_native(ctx) -> float:
    import lightgbm as lgb
    t0 = time.perf_counter()
    lgb.train({**LGB_PARAMS, "num_threads": 2}, lgb.Dataset(ctx.X, label=ctx.y), num_boost_round=ctx.rounds)
    return time.perf_counter() - t0


def lgb_hand(ctx) -> float:
    return lgb_hand_launched(ctx.tmp, ctx.rounds, LGB_PARAMS)


def lgb_gangway(ctx) -> float:
    from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
    est = LightGBMEstimator(n_estimators=ctx.rounds, params=dict(LGB_PARAMS),
                            scaling_config=LightGBMScalingConfig(num_workers=2, num_cpu_per_worker=1))
    return gangway_fit(ctx, est, ctx.df, "lgb warm")


def lgb_dask(ctx) -> float:
    import lightgbm as lgb
    t0 = time.perf_counter()
    X, y = dask_arrays(ctx)
    model = lgb.DaskLGBMClassifier(client=ctx.dask, n_estimators=ctx.rounds, n_jobs=1,
                                   **{k: v for k, v in LGB_PARAMS.items() if k != "objective"})
    model.fit(X, y)
    return time.perf_counter() - t0


def ray_lgb_loop(config: dict):
    import lightgbm as lgb
    import ray.train
    from ray.train.lightgbm import get_network_params
    df = ray.train.get_dataset_shard("train").materialize().to_pandas()
    lgb.train({**config["params"], "num_threads": 1, "tree_learner": "data", **get_network_params()},
              lgb.Dataset(df[config["features"]], label=df[config["label"]]), num_boost_round=config["rounds"])


def lgb_ray(ctx) -> float:
    import ray.data
    from ray.train.lightgbm import LightGBMTrainer
    t0 = time.perf_counter()
    LightGBMTrainer(ray_lgb_loop, scaling_config=ray_scaling(), run_config=ray_run_config(ctx),
                    train_loop_config={"features": FEATURES, "label": LABEL, "params": LGB_PARAMS,
                                       "rounds": ctx.rounds},
                    datasets={"train": ray.data.from_pandas(ctx.df)}).fit()
    return time.perf_counter() - t0


# PyTorch DDP -----------------------------------------------------------------------------------
def ddp_loop(X, y, steps, batch):
    """What every launcher runs: MLP 28->256->256->1, SGD, seed 0, ``steps`` batches of this rank's rows.
    Returns wall-clock marks, so time to first step is measured from the bench's launch time."""
    import time

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    if not dist.is_initialized():   # Ray Train's TorchTrainer has joined the group already
        dist.init_process_group(backend="gloo")
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(28, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 1)))
    opt, loss_fn = torch.optim.SGD(model.parameters(), lr=0.01), torch.nn.BCEWithLogitsLoss()
    X, y = torch.as_tensor(X), torch.as_tensor(y).reshape(-1, 1)
    per_epoch = max(1, len(X) // batch)
    t_first = None
    for step in range(steps):
        lo = (step % per_epoch) * batch
        opt.zero_grad()
        loss = loss_fn(model(X[lo:lo + batch]), y[lo:lo + batch])
        loss.backward()
        opt.step()
        if t_first is None:
            t_first = time.time()
    t_end = time.time()
    return {"t_first": t_first, "t_end": t_end, "steps": steps, "threads": torch.get_num_threads(),
            "last_loss": float(loss)}


def ddp_gangway_train():
    import numpy as np

    from producer.pytorch import get_context
    ctx = get_context()
    hp = ctx.get_hyper_params()
    table = ctx.get_dataset_map()["train"].get_shard().to_arrow()
    X = np.column_stack([table.column(c).to_numpy() for c in hp["features"]]).astype(np.float32, copy=False)
    out = ddp_loop(X, table.column(hp["label"]).to_numpy(), hp["steps"], hp["batch"])
    if ctx.get_rank() == 0:
        ctx.get_metrics_reporter().log_metrics(out)


def ray_torch_loop(config: dict):
    import ray.train
    df = ray.train.get_dataset_shard("train").materialize().to_pandas()
    out = ddp_loop(df[config["features"]].to_numpy(np.float32), df[config["label"]].to_numpy(np.float32),
                   config["steps"], config["batch"])
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump(out, f)


TORCHRUN_MAIN = """
import json, os, sys, numpy as np
folder, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rank = int(os.environ["RANK"])
out = ddp_loop(np.load(f"{folder}/X{rank}.npy"), np.load(f"{folder}/y{rank}.npy"), steps, batch)
if rank == 0:
    with open(f"{folder}/torchrun-out.json", "w") as f:
        json.dump(out, f)
"""


def ddp_result(out: dict, t_launch: float, t_done: float) -> dict:
    return {"first_step": out["t_first"] - t_launch,
            "step_ms": (out["t_end"] - out["t_first"]) / max(1, out["steps"] - 1) * 1000,
            "wall": t_done - t_launch, "threads": out["threads"], "loss": out["last_loss"]}


def ddp_torchrun(ctx) -> dict:
    script = os.path.join(ctx.tmp, "ddp_torchrun.py")
    with open(script, "w") as f:
        f.write(inspect.getsource(ddp_loop) + TORCHRUN_MAIN)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    t0 = time.time()
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", script, ctx.tmp, str(ctx.steps),
                           str(BATCH)], env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                          text=True)
    t1 = time.time()
    if proc.returncode:
        raise RuntimeError(f"torchrun exited with {proc.returncode}: {proc.stderr[-2000:]}")
    with open(os.path.join(ctx.tmp, "torchrun-out.json")) as f:
        return ddp_result(json.load(f), t0, t1)


def ddp_gangway(ctx) -> dict:
    from producer.connectors import ShardedDataConnector
    from producer.pytorch import PyTorchDistributor, PyTorchScalingConfig, WorkerResourceConfig
    dist = PyTorchDistributor(ddp_gangway_train, PyTorchScalingConfig(
        num_nodes=1, num_workers_per_node=2,
        resource_requirements_per_worker=WorkerResourceConfig(num_cpus=1, num_gpus=0)))
    hp = {"steps": ctx.steps, "batch": BATCH, "features": FEATURES, "label": LABEL}
    t0 = time.time()
    result = dist.run(dataset_map={"train": ShardedDataConnector.from_dataframe(ctx.df)}, hyper_params=hp)
    return ddp_result(result.get_metrics(), t0, time.time())


def ddp_ray(ctx) -> dict:
    import ray.data
    from ray.train.torch import TorchConfig, TorchTrainer
    out = os.path.join(ctx.tmp, "ray-torch-out.json")
    t0 = time.time()
    TorchTrainer(ray_torch_loop, scaling_config=ray_scaling(), run_config=ray_run_config(ctx),
                 torch_config=TorchConfig(backend="gloo"),
                 train_loop_config={"features": FEATURES, "label": LABEL, "steps": ctx.steps, "batch": BATCH,
                                    "out": out},
                 datasets={"train": ray.data.from_pandas(ctx.df)}).fit()
    t1 = time.time()
    with open(out) as f:
        return ddp_result(json.load(f), t0, t1)


# the job's own timeline ------------------------------------------------------------------------
def timeline(job, t_call: float, t_return: float) -> dict:
    """Seconds between the marks the job itself recorded, plus the client's call and return."""
    state = job.client.state
    rec, by_rank = state.job(job.job_id), state.ranks(job.job_id)
    ranks = list(by_rank.values())
    summary = [r.get("summary") or {} for r in ranks]

    def latest(key: str) -> float:
        return max(float(r[key]) for r in ranks if r.get(key) is not None)

    rank0 = by_rank.get(0) or ranks[0]
    # When training ended in the ranks (the child's own clock: after connect, matrix and train seconds).
    trained = max(float(r["t_training"]) + sum(float((r.get("summary") or {}).get(k) or 0) for k in
                                               ("connect_seconds", "dmatrix_seconds", "train_seconds"))
                  for r in ranks)
    marks = {"call": t_call, "submitted": float(rec["submitted_at"]), "persisted": float(rec["persisted_at"]),
             "placed": float(rec["started_at"]), "fetching": latest("t_fetching"), "waiting": latest("t_waiting"),
             "training": latest("t_training"), "trained": trained,
             "rank 0 uploading": float(rank0.get("t_uploading") or trained), "rank succeeded": latest("t_succeeded"),
             "job finished": float(rec["finished_at"]), "returned": t_return}
    names = list(marks)
    out = {f"{a} -> {b}": marks[b] - marks[a] for a, b in zip(names, names[1:])}
    out["call -> returned (whole fit)"] = t_return - t_call
    for key in ("fetch_seconds", "connect_seconds", "dmatrix_seconds", "train_seconds"):
        vals = [float(s[key]) for s in summary if s.get(key) is not None]
        if vals:
            out[f"  in the ranks: {key} (max)"] = max(vals)
    return out


# run -------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, a, X, y, tmp):
        self.rows, self.rounds, self.steps, self.tmp = a.rows, a.rounds, a.steps, tmp
        self.X, self.y, self.df = X, y, frame(X, y)
        self.dask = None
        self.cold_seed = 0
        self.timelines: dict[str, list[dict]] = {}


def frame(X: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({**{name: X[:, i] for i, name in enumerate(FEATURES)}, LABEL: y})


# group -> [(framework, row, fn)]; a group shares a runtime that is up only while its rows run.
def groups(only: set[str]) -> dict[str, list[tuple[str, str, object]]]:
    g = {
        "by hand": [("xgb", "native xgb.train, 1 process x 2 threads", xgb_native),
                    ("xgb", "hand-launched 2-process collective", xgb_hand),
                    ("lgb", "native lgb.train, 1 process x 2 threads", lgb_native),
                    ("lgb", "hand-launched 2-process socket network", lgb_hand),
                    ("ddp", "torchrun --nproc-per-node 2", ddp_torchrun)],
        "gangway": [("xgb", "gangway cold fit (hash + upload included)", xgb_gangway_cold),
                    ("xgb", "gangway warm fit, from_dataframe(df) again", xgb_gangway_warm),
                    ("lgb", "gangway warm fit, from_dataframe(df) again", lgb_gangway),
                    ("ddp", "gangway PyTorchDistributor", ddp_gangway)],
        "dask": [("xgb", "xgboost.dask on LocalCluster(2 x 1 thread)", xgb_dask),
                 ("lgb", "lightgbm.dask on LocalCluster(2 x 1 thread)", lgb_dask)],
        "ray": [("xgb", "Ray Train XGBoostTrainer, bare", lambda c: xgb_ray(c, False)),
                ("xgb", "Ray Train XGBoostTrainer + RayTrainReportCallback", lambda c: xgb_ray(c, True)),
                ("lgb", "Ray Train LightGBMTrainer", lgb_ray),
                ("ddp", "Ray Train TorchTrainer", ddp_ray)],
    }
    return {k: [r for r in rows if r[0] in only] for k, rows in g.items()}


def missing(group: str) -> str | None:
    need = {"dask": ["dask", "distributed"], "ray": ["ray"]}.get(group, [])
    gone = [m for m in need if not have(m)]
    return f"{group}: skipped, {', '.join(gone)} not installed (pip install -e '.[peers]')" if gone else None


def start_group(ctx, group: str) -> None:
    if group == "dask":
        from distributed import Client, LocalCluster
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        ctx.dask = Client(cluster)
    elif group == "ray":
        import ray
        # 2 training workers x 1 CPU plus room for Ray Data's read tasks: 4 logical CPUs on the 2 cores.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)


def stop_group(ctx, group: str) -> None:
    if group == "dask" and ctx.dask is not None:
        cluster = ctx.dask.cluster
        ctx.dask.close()
        cluster.close()
        ctx.dask = None
    elif group == "ray":
        import ray
        ray.shutdown()


def run_rounds(ctx, a, results: dict, skipped: list[str], load: list[tuple]) -> None:
    plan = groups(set(a.only.split(",")))
    order = [g for g in plan if plan[g] and g in a.groups.split(",")]
    for g in list(order):
        why = missing(g)
        if why:
            skipped.append(why)
            log(why)
            order.remove(g)
    for rnd in range(a.repeat):
        rotated = order[rnd % len(order):] + order[:rnd % len(order)]
        log(f"round {rnd + 1}/{a.repeat}: {' -> '.join(rotated)}; load average {os.getloadavg()[0]:.2f}")
        for g in rotated:
            start_group(ctx, g)
            try:
                for fw, name, fn in plan[g]:
                    log(f"  {fw}: {name}")
                    try:
                        results.setdefault((fw, name), []).append(fn(ctx))
                    except Exception as exc:   # a peer that fails is reported, the others still run
                        log(f"  {fw}: {name} FAILED: {type(exc).__name__}: {exc}")
                        results.setdefault((fw, name), []).append(exc)
            finally:
                stop_group(ctx, g)
        load.append(os.getloadavg())
        if a.partial:   # the table so far, so a run cut short still leaves its rounds behind
            with open(a.partial, "w") as f, contextlib.redirect_stdout(f):
                report(ctx, a, results, skipped, load)


# report ----------------------------------------------------------------------------------------
def spread(vals: list[float], fmt: str = "{:.2f}") -> tuple[str, str]:
    return fmt.format(statistics.median(vals)), f"{fmt.format(min(vals))}-{fmt.format(max(vals))}"


def gbdt_table(fw: str, results: dict, hand: str, warm: str) -> list[str]:
    lines = ["| peer | median (s) | min-max (s) | runs | / hand-launched |", "|---|---|---|---|---|"]
    times = {name: [v for v in vals if isinstance(v, float)] for (f, name), vals in results.items() if f == fw}
    base = statistics.median(times[hand]) if times.get(hand) else None
    for (f, name), vals in results.items():
        if f != fw:
            continue
        ok = times[name]
        fails = len(vals) - len(ok)
        if not ok:
            lines.append(f"| {name} | failed | - | 0 ({fails} failed) | - |")
            continue
        med, rng = spread(ok)
        ratio = f"{statistics.median(ok) / base:.3f}" if base else "-"
        lines.append(f"| {name} | {med} | {rng} | {len(ok)}{f' ({fails} failed)' if fails else ''} | {ratio} |")
    return lines


def gbdt_targets(fw: str, results: dict, hand: str, warm: str) -> list[str]:
    times = {name: [v for v in vals if isinstance(v, float)] for (f, name), vals in results.items() if f == fw}
    if not times.get(hand) or not times.get(warm):
        return []
    w, h = statistics.median(times[warm]), statistics.median(times[hand])
    out = [f"| {fw}: gangway warm / hand-launched | {w / h:.3f} | <= 1.05 | {'pass' if w / h <= 1.05 else 'FAIL'} |"]
    for name, ok in times.items():
        if ok and ("dask" in name or "Ray" in name):
            m = statistics.median(ok)
            out.append(f"| {fw}: gangway warm faster than {name} | {w:.2f} s vs {m:.2f} s | faster | "
                       f"{'pass' if w < m else 'FAIL'} |")
    return out


def ddp_table(results: dict) -> tuple[list[str], list[str]]:
    lines = ["| launcher | time to first step, median (min-max) s | steady step, median (min-max) ms | "
             "launch -> done, median s | runs | threads | last loss |", "|---|---|---|---|---|---|---|"]
    steady = {}
    for (f, name), vals in results.items():
        if f != "ddp":
            continue
        ok = [v for v in vals if isinstance(v, dict)]
        if not ok:
            lines.append(f"| {name} | failed | failed | - | 0 ({len(vals)} failed) | - | - |")
            continue
        first, first_rng = spread([v["first_step"] for v in ok])
        step, step_rng = spread([v["step_ms"] for v in ok])
        steady[name] = statistics.median(v["step_ms"] for v in ok)
        lines.append(f"| {name} | {first} ({first_rng}) | {step} ({step_rng}) | "
                     f"{statistics.median(v['wall'] for v in ok):.2f} | {len(ok)} | {ok[0]['threads']} | "
                     f"{ok[0]['loss']:.4f} |")
    targets = []
    tr, gw = steady.get("torchrun --nproc-per-node 2"), steady.get("gangway PyTorchDistributor")
    if tr and gw:
        targets.append(f"| ddp: gangway steady step / torchrun | {gw / tr:.3f} | <= 1.02 | "
                       f"{'pass' if gw / tr <= 1.02 else 'FAIL'} |")
    ray = steady.get("Ray Train TorchTrainer")
    if ray and gw:
        targets.append(f"| ddp: gangway steady step faster than Ray Train | {gw:.2f} ms vs {ray:.2f} ms | faster | "
                       f"{'pass' if gw < ray else 'FAIL'} |")
    return lines, targets


def timeline_table(ctx) -> list[str]:
    kinds = [k for k in ("xgb warm", "xgb cold", "lgb warm") if ctx.timelines.get(k)]
    if not kinds:
        return []
    keys = list(ctx.timelines[kinds[0]][0])
    lines = ["| stage (job's own marks), median ms | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for key in keys:
        cells = []
        for k in kinds:
            vals = [t[key] for t in ctx.timelines[k] if key in t]
            cells.append(f"{statistics.median(vals) * 1000:.0f}" if vals else "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def report(ctx, a, results: dict, skipped: list[str], load: list[tuple]) -> None:
    print(f"command: `{shlex.join(['python', *sys.argv])}`\n")
    print(f"{a.rows:,} rows x 28 float32 features, binary label; GBDT {a.rounds} rounds, max_depth 6 "
          f"(LightGBM num_leaves 31), 2 workers x 1 thread, no per-round evaluation; DDP MLP 28-256-256-1, "
          f"batch {BATCH}, {a.steps} steps, gloo, seed 0; {a.repeat} alternating rounds; {os.cpu_count()} CPUs; "
          f"load average (1 min) at the start and after each round: "
          f"{' / '.join(f'{x[0]:.1f}' for x in load)}\n")
    print("versions: " + ", ".join(f"{d} {version(d)}" for d in
                                   ("gangway", "xgboost", "lightgbm", "torch", "dask", "distributed", "scikit-learn", "ray")) + "\n")
    for line in skipped:
        print(f"- {line}")
    if skipped:
        print()
    targets = []
    for fw, title, hand, warm in (
            ("xgb", "XGBoost", "hand-launched 2-process collective", "gangway warm fit, from_dataframe(df) again"),
            ("lgb", "LightGBM", "hand-launched 2-process socket network",
             "gangway warm fit, from_dataframe(df) again")):
        if any(f == fw for f, _ in results):
            print(f"### {title}\n")
            print("\n".join(gbdt_table(fw, results, hand, warm)) + "\n")
            targets += gbdt_targets(fw, results, hand, warm)
    if any(f == "ddp" for f, _ in results):
        lines, t = ddp_table(results)
        print("### PyTorch DDP\n")
        print("\n".join(lines) + "\n")
        targets += t
    if targets:
        print("### Targets\n")
        print("| target | measured | wanted | pass/fail |\n|---|---|---|---|")
        print("\n".join(targets) + "\n")
    tl = timeline_table(ctx)
    if tl:
        print("### Inside gangway's fits (medians of the job's own marks)\n")
        print("\n".join(tl))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300, help="DDP optimizer steps")
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds (every row once per round)")
    ap.add_argument("--only", default="xgb,lgb,ddp", help="comma-separated subset of xgb,lgb,ddp")
    ap.add_argument("--groups", default="by hand,gangway,dask,ray",
                    help="comma-separated subset of the row groups: by hand, gangway, dask, ray")
    ap.add_argument("--partial", default="", help="rewrite the table to this file after every round")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gangway-peers-")
    log(f"generating {a.rows:,} x 28 rows; scratch {tmp}")
    X, y = make_data(a.rows, seed=1)
    write_halves(X, y, tmp)
    ctx, results, skipped, load = Ctx(a, X, y, tmp), {}, [], [os.getloadavg()]
    try:
        with embedded_fleet(os.path.join(tmp, "home")):
            log("first fit of the frame: uploads it, so every 'warm' row finds it in the store")
            from producer.connectors import DataConnector
            xgb_estimator(2).fit(DataConnector.from_dataframe(ctx.df), input_cols=FEATURES, label_col=LABEL)
            run_rounds(ctx, a, results, skipped, load)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(ctx, a, results, skipped, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
