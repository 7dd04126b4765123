"""XGBoost inside the training child: QuantileDMatrix from the Arrow shard, rabit collective."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import xgboost as xgb
from xgboost.tracker import RabitTracker

from common.arrays import finite_labels, float32_column, float32_matrix
from common.categories import xgboost_feature_types
from common.datasets import CachedSlice, read_cached
from common.errors import WorkerMemoryError
from common.settings import Settings
from workers.runtime.checkpoints import BoosterCheckpoints, checkpoint_due
from workers.runtime.events import Emitter, matrix_progress
from workers.runtime.shards import RankData, fetch_planned, warm_store


@dataclass
class Prepared:
    payload: dict
    settings: Settings
    data: RankData
    tracker: object = None
    published: dict = field(default_factory=dict)   # shared with every rank at the barrier

    def fetch_summary(self) -> dict:
        return {**self.data.summary(), "publish": self.published}


def prepare(payload: dict, settings: Settings) -> Prepared:
    spec = payload["spec"]
    world = payload["rendezvous"]["world_size"]
    # XGBoost all-reduces eval metrics, so the eval set is sharded like the training data.
    datasets = {k: {**v, "sharded": True} for k, v in spec["datasets"].items()}
    # Chunk files either way: the in-core QuantileDMatrix is built from them chunk by chunk too.
    prep = Prepared(payload, settings, fetch_planned(payload, settings, datasets, world, stream_in_core=True,
                                                            sketch=True))
    if payload["rank"] == 0:
        latest = payload.get("resume") if payload.get("attempt", 1) > 1 else None   # chosen by the supervisor
        if latest:
            prep.published["resume_key"], prep.published["resume_rounds"] = latest
    if payload["rank"] == 0 and world > 1:
        # The tracker lives in rank 0's training child: it starts before the barrier, so peers
        # find it listening, and an abort that kills the child takes the tracker with it. A gang of
        # one has no collective: no tracker (starting one costs ~0.1 s, a small job's whole training).
        prep.tracker, port = start_tracker(payload["rendezvous"], world, settings.rendezvous_timeout)
        prep.published["tracker_port"] = port
    return prep


def _checkpoints(prep: Prepared, emitter: Emitter) -> BoosterCheckpoints:
    """Checkpoints under this attempt's prefix; each stored one is reported for the supervisor to record."""
    def saved(rounds: int, key: str) -> None:
        emitter.emit("checkpoint", uri=f"s3://{prep.settings.artifact_bucket}/{key}", key=key, rounds=rounds)
    return BoosterCheckpoints(prep.settings, warm_store(prep.settings), prep.payload["job_id"],
                              prep.payload["token"], "ubj", on_saved=saved)


def start_tracker(rdv: dict, world: int, timeout: float) -> tuple[RabitTracker, int]:
    """Bind the first free candidate port of rank 0's block, else an ephemeral port.

    XGBoost's tracker binds without SO_REUSEADDR, so a port whose last job's
    connections sit in TIME_WAIT (about 60 s) cannot be bound again; jobs in quick
    succession on one gang walk the block, and past its end the OS picks a port.
    """
    for port in [*(rdv.get("tracker_ports") or [rdv["tracker_port"]]), 0]:
        try:
            tracker = RabitTracker(n_workers=world, host_ip=rdv["tracker_host"], port=port, sortby="task",
                                   timeout=int(timeout))
        except xgb.core.XGBoostError:
            continue
        tracker.start()
        return tracker, int(tracker.worker_args()["dmlc_tracker_port"])
    raise RuntimeError(f"cannot start the XGBoost tracker on {rdv['tracker_host']} (no port could be bound)")


class ArrowBatches(xgb.DataIter):
    """Feeds a QuantileDMatrix one Arrow batch at a time (no full float matrix copy)."""

    def __init__(self, table: pa.Table, features: list[str], label: str, weight: str | None,
                 batch_rows: int = 32768, feature_types: list[str] | None = None, dataset: str = "train") -> None:
        self._batches = table.select(features + [label] + ([weight] if weight else [])).to_batches(batch_rows)
        self._features, self._label, self._weight = features, label, weight
        self._types, self._dataset = feature_types, dataset
        self._i = 0
        super().__init__(release_data=True)

    def next(self, input_data) -> bool:
        if self._i == len(self._batches):
            return False
        b = self._batches[self._i]
        X = float32_matrix(b, self._features)
        y = float32_column(b.column(b.schema.get_field_index(self._label)))
        first = sum(len(x) for x in self._batches[:self._i])
        kw = {"label": finite_labels(y, self._label, self._dataset, first)}
        if self._weight:
            kw["weight"] = float32_column(b.column(b.schema.get_field_index(self._weight)))
        input_data(data=X, feature_names=self._features, feature_types=self._types, **kw)
        self._i += 1
        return True

    def reset(self) -> None:
        self._i = 0


class CachedChunks(xgb.DataIter):
    """Feeds a matrix one cached chunk file at a time (memory-mapped, unmapped once consumed): an
    ``ExtMemQuantileDMatrix``, whose quantised pages XGBoost writes under ``cache_prefix`` (the rank
    folder), or an in-core ``QuantileDMatrix`` (``cache_prefix=None``), so the raw shard is never
    whole in memory."""

    def __init__(self, pieces: list[CachedSlice], features: list[str], label: str, weight: str | None,
                 cache_prefix: str | None, feature_types: list[str] | None = None,
                 on_chunk: Callable[[int, int], None] | None = None, dataset: str = "train") -> None:
        self._pieces, self._features, self._label, self._weight = pieces, features, label, weight
        self._types, self._on_chunk, self._dataset = feature_types, on_chunk, dataset
        self._i = 0
        super().__init__(cache_prefix=cache_prefix, release_data=True)

    def next(self, input_data) -> bool:
        if self._i == len(self._pieces):
            return False
        table = read_cached(self._pieces[self._i])
        first = sum(p.length for p in self._pieces[:self._i])
        kw = {"label": finite_labels(float32_column(table.column(self._label)), self._label, self._dataset, first)}
        if self._weight:
            kw["weight"] = float32_column(table.column(self._weight))
        input_data(data=float32_matrix(table, self._features), feature_names=self._features,
                   feature_types=self._types, **kw)
        self._i += 1
        if self._on_chunk is not None:
            self._on_chunk(self._i, len(self._pieces))
        return True

    def reset(self) -> None:
        self._i = 0


def build_matrices(prep: Prepared, feats: list[str], label: str, weight: str | None, max_bin: int,
                   nthread: int, categorical: list[str] | None = None,
                   on_chunk: Callable[[str, int, int], None] | None = None) -> list[tuple[xgb.DMatrix, str]]:
    """(train, eval) matrices: in-core QuantileDMatrix from the Arrow shard, or ExtMemQuantileDMatrix
    over the cached chunks when the shard does not fit the worker's memory budget. Categorical
    features arrive as codes that mean the same on every rank (one mapping per dataset, see
    ``common.categories``) and are trained natively. ``on_chunk(name, i, n)`` hears of every chunk a
    matrix consumes: building one from a big shard takes minutes and is progress, not silence."""
    data = prep.data
    types = xgboost_feature_types(feats, categorical or [])
    cat = types is not None
    if data.cached and data.extra.get("memory", {}).get("mode") == "external":
        if not hasattr(xgb, "ExtMemQuantileDMatrix"):
            raise WorkerMemoryError(f"this shard needs out-of-core training ({data.extra.get('memory')}), which "
                                    f"needs xgboost >= 3.0 (this worker has {xgb.__version__})")
        pages = os.path.join(prep.payload["workdir"], "xgb-extmem")   # a subfolder: never uploaded
        os.makedirs(pages, exist_ok=True)

        def matrix(name: str, ref=None):
            it = CachedChunks(data.cached[name], feats, label, weight, os.path.join(pages, name), types,
                              _named(on_chunk, name), name)
            return xgb.ExtMemQuantileDMatrix(it, max_bin=max_bin, nthread=nthread, ref=ref, enable_categorical=cat)
        names = list(data.cached)
    elif data.cached:
        def matrix(name: str, ref=None):
            it = CachedChunks(data.cached[name], feats, label, weight, None, types, _named(on_chunk, name), name)
            return xgb.QuantileDMatrix(it, max_bin=max_bin, nthread=nthread, ref=ref, enable_categorical=cat)
        names = list(data.cached)
    else:
        def matrix(name: str, ref=None):
            return xgb.QuantileDMatrix(ArrowBatches(data.tables[name], feats, label, weight, feature_types=types,
                                                    dataset=name),
                                       max_bin=max_bin, nthread=nthread, ref=ref, enable_categorical=cat)
        names = list(data.tables)
    dtrain = matrix("train")
    evals = [(dtrain, "train")]
    if "eval" in names:
        evals.append((matrix("eval", ref=dtrain), "eval"))
    return evals


def _named(on_chunk: Callable[[str, int, int], None] | None, name: str) -> Callable[[int, int], None] | None:
    return None if on_chunk is None else (lambda i, n: on_chunk(name, i, n))


class Relay(xgb.callback.TrainingCallback):
    """Progress every round (droppable), rank 0's eval line every ``verbose_eval`` rounds and its
    checkpoint every ``checkpoint_every`` rounds."""

    def __init__(self, emitter: Emitter, rank: int, total: int, verbose_eval: int | None,
                 checkpoints: BoosterCheckpoints | None = None, checkpoint_every: int = 0,
                 checkpoint_seconds: float = 0.0) -> None:
        self.emitter, self.rank, self.total, self.every = emitter, rank, total, verbose_eval
        self.checkpoints, self.checkpoint_every, self.checkpoint_seconds = checkpoints, checkpoint_every, \
            checkpoint_seconds
        self._t = self._last_checkpoint = time.perf_counter()
        self._last_line, self._printed = "", True

    def after_training(self, model):
        if self.rank == 0 and self.every and not self._printed:   # early stopping ended between two lines
            self.emitter.emit("eval", line=self._last_line)
        return model

    def after_iteration(self, model, epoch: int, evals_log) -> bool:
        latest = {f"{d}-{m}": float(v[-1]) for d, ms in evals_log.items() for m, v in ms.items()}
        done = model.num_boosted_rounds()
        now = time.perf_counter()
        self.emitter.emit("progress", droppable=True, iter=done, total=self.total, metrics=latest,
                          iter_seconds=now - self._t)
        self._t = now
        self._last_line = f"[{epoch}]\t" + "\t".join(f"{k}:{v:.5f}" for k, v in latest.items())
        self._printed = False
        if self.rank == 0 and self.every and (epoch % self.every == 0 or done == self.total):
            self.emitter.emit("eval", line=self._last_line)
            self._printed = True
        if self.checkpoints is not None and checkpoint_due(done, self.total, self.checkpoint_every,
                                                           now - self._last_checkpoint, self.checkpoint_seconds):
            self.checkpoints.save_async(done, bytes(model.save_raw("ubj")))
            self._last_checkpoint = now
        return False


def train(prep: Prepared, emitter: Emitter, shared: dict) -> dict:
    p, spec, rdv = prep.payload, prep.payload["spec"], prep.payload["rendezvous"]
    opts = spec["train"]
    rank = p["rank"]
    params = dict(spec["params"])
    params.pop("enable_categorical", None)   # a DMatrix argument (from categorical_cols), not a booster parameter
    params.setdefault("nthread", prep.settings.worker_cpus or os.cpu_count() or 1)   # the worker's CPU share
    if p.get("use_gpu"):
        params["device"] = "cuda"
    rounds = int(opts["num_boost_round"])
    comm = {"dmlc_communicator": "rabit", "dmlc_tracker_uri": rdv["tracker_host"],
            "dmlc_tracker_port": int(shared.get("tracker_port", rdv["tracker_port"])), "dmlc_task_id": f"{rank:06d}",
            "dmlc_timeout": int(prep.settings.rendezvous_timeout)}
    evals_result: dict = {}
    world = int(rdv["world_size"])
    t0 = time.perf_counter()
    with xgb.collective.CommunicatorContext(**comm) if world > 1 else contextlib.nullcontext():
        t_connected = time.perf_counter()
        if world > 1 and xgb.collective.get_rank() != rank:
            raise RuntimeError(f"tracker gave rank {xgb.collective.get_rank()} to gang rank {rank}")
        feats, label, weight = opts["input_cols"], opts["label_col"], opts.get("weight_col")
        max_bin = int(params.get("max_bin", 256))
        nthread = int(params["nthread"])
        evals = build_matrices(prep, feats, label, weight, max_bin, nthread, opts.get("categorical_cols"),
                               matrix_progress(emitter))
        dtrain = evals[0][0]
        prep.data.tables.clear()   # the quantised matrices hold all XGBoost needs: free the Arrow shard
        t_data = time.perf_counter()
        ckpt = _checkpoints(prep, emitter)
        start, done_before = None, int(shared.get("resume_rounds") or 0)
        if shared.get("resume_key"):   # a retry: every rank resumes from the checkpoint rank 0 chose
            start = xgb.Booster()
            start.load_model(bytearray(ckpt.load(shared["resume_key"])))
            if rank == 0:
                emitter.emit("eval", line=f"[gangway] resuming from the checkpoint after round {done_before}")
        relay = Relay(emitter, rank, rounds, opts.get("verbose_eval"), ckpt if rank == 0 else None,
                      prep.settings.checkpoint_rounds, prep.settings.checkpoint_seconds)
        # Evaluate what was asked for, as xgb.train does: the eval set when given; the training set only
        # when the user watches the lines (verbose_eval), since it costs a pass over the shard each round.
        asked = [(m, name) for m, name in evals if name != "train" or opts.get("verbose_eval")]
        booster = xgb.train(params, dtrain, num_boost_round=rounds - done_before, evals=asked,
                            evals_result=evals_result, xgb_model=start,
                            early_stopping_rounds=opts.get("early_stopping_rounds"), verbose_eval=False,
                            callbacks=[relay])
        ckpt.flush()
    if prep.tracker is not None:
        prep.tracker.wait_for(int(prep.settings.rendezvous_timeout))
    raw = booster.save_raw("ubj")
    summary = {"model_sha256": hashlib.sha256(raw).hexdigest(), "num_boosted_rounds": booster.num_boosted_rounds(),
               "connect_seconds": t_connected - t0, "dmatrix_seconds": t_data - t_connected,
               "train_seconds": time.perf_counter() - t_data,
               "best_iteration": getattr(booster, "best_iteration", None), "resumed_from_round": done_before}
    if rank == 0:
        out = p["workdir"]
        with open(os.path.join(out, "model.ubj"), "wb") as f:
            f.write(raw)
        with open(os.path.join(out, "eval_results.json"), "w") as f:
            json.dump(evals_result, f)
    return summary
