"""LightGBM inside the training child: socket network from the gang's port blocks, data-parallel.

Each rank binds the first free port of its own block and publishes it at the Redis
barrier, so LightGBM never opens a socket to a peer that is not there (it would
retry for minutes, then crash) and a port in TIME_WAIT from the last job is skipped.
Every rank gets the whole eval set: LightGBM's metrics are local, and ranks that
saw different eval rows would stop early at different rounds.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np

from common.arrays import finite_labels, float32_column, float32_matrix
from common.datasets import CachedSlice, read_cached
from common.settings import Settings
from workers.runtime.checkpoints import BoosterCheckpoints, checkpoint_due
from workers.runtime.events import Emitter, matrix_progress
from workers.runtime.ports import first_free_port
from workers.runtime.shards import RankData, fetch_planned, warm_store

PARALLEL_LEARNERS = ("data", "feature", "voting", "data_parallel", "feature_parallel", "voting_parallel")
_GPU_DEVICES = ("gpu", "cuda")


@dataclass
class Prepared:
    payload: dict
    settings: Settings
    data: RankData
    published: dict = field(default_factory=dict)

    def fetch_summary(self) -> dict:
        return {**self.data.summary(), "publish": self.published}


def free_listen_port(settings: Settings) -> int:
    lo, hi = settings.port_block
    return first_free_port(settings.worker_host, [lo + 2, *range(lo + 3, hi + 1)], "LightGBM listen",
                           f"GANGWAY_WORKER_PORTS={settings.worker_ports}")


def prepare(payload: dict, settings: Settings) -> Prepared:
    spec, rank = payload["spec"], payload["rank"]
    world = payload["rendezvous"]["world_size"]
    datasets = {k: {**v, "sharded": k == "train"} for k, v in spec["datasets"].items()}
    # A retry resumes from a checkpoint: LightGBM then predicts its init scores from the raw data,
    # which it cannot do from chunk Sequences, so a retried attempt holds its data in memory.
    prep = Prepared(payload, settings, fetch_planned(payload, settings, datasets, world,
                                                     external_ok=payload.get("attempt", 1) == 1,
                                                     bins_in_memory=True, bin_sample=True))
    if world > 1:
        prep.published[f"listen_port_{rank}"] = free_listen_port(settings)
    if rank == 0 and payload.get("attempt", 1) > 1:
        latest = payload.get("resume")   # the newest recorded checkpoint, chosen by the supervisor
        if latest:
            prep.published["resume_key"], prep.published["resume_rounds"] = latest
    return prep


def _checkpoints(prep: Prepared, emitter: Emitter) -> BoosterCheckpoints:
    """Checkpoints under this attempt's prefix; each stored one is reported for the supervisor to record."""
    def saved(rounds: int, key: str) -> None:
        emitter.emit("checkpoint", uri=f"s3://{prep.settings.artifact_bucket}/{key}", key=key, rounds=rounds)
    return BoosterCheckpoints(prep.settings, warm_store(prep.settings), prep.payload["job_id"],
                              prep.payload["token"], "txt", on_saved=saved)


def _dataset(table, opts: dict, reference=None, name: str = "train") -> lgb.Dataset:
    feats, label, weight = opts["input_cols"], opts["label_col"], opts.get("weight_col")
    y = finite_labels(table.column(label).to_numpy(zero_copy_only=False).astype(np.float64, copy=False), label, name)
    return lgb.Dataset(float32_matrix(table, feats), label=y,
                       weight=table.column(weight).to_numpy(zero_copy_only=False) if weight else None,
                       feature_name=feats, categorical_feature=_categorical(opts), reference=reference,
                       free_raw_data=True)


def _categorical(opts: dict):
    """Categorical features by name: their codes mean the same on every rank (one mapping per dataset)."""
    return list(opts.get("categorical_cols") or []) or "auto"


class ChunkSequence(lgb.Sequence):
    """One cached chunk's feature rows for LightGBM, read from its memory-mapped file: the Dataset is
    binned from these batch by batch, so the raw float matrix never exists whole."""

    batch_size = 4096
    _current: tuple[int, object] | None = None   # (id, matrix) of the chunk being sampled: one at a time

    def __init__(self, piece: CachedSlice, features: list[str], on_read: Callable[[], None] | None = None) -> None:
        self.piece, self.features, self.on_read = piece, features, on_read

    def __len__(self) -> int:
        return self.piece.length

    def _matrix(self):
        # LightGBM samples rows one by one, in order: keep the current chunk's matrix, drop the last one's.
        current = ChunkSequence._current
        if current is None or current[0] != id(self):
            ChunkSequence._current = current = (id(self), float32_matrix(read_cached(self.piece), self.features))
            if self.on_read is not None:
                self.on_read()
        return current[1]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            ChunkSequence._current = None
            if self.on_read is not None:
                self.on_read()
            rows = read_cached(self.piece).slice(idx.start or 0, (idx.stop or len(self)) - (idx.start or 0))
            return float32_matrix(rows, self.features)
        return self._matrix()[idx].astype(np.float64)   # LightGBM's sampler takes doubles


def _chunked_dataset(pieces: list[CachedSlice], opts: dict, reference=None,
                     on_chunk: Callable[[int, int], None] | None = None, name: str = "train") -> lgb.Dataset:
    """A Dataset from cached chunks (out of core): labels and weights in memory, features streamed.
    ``on_chunk(i, n)`` hears of each chunk read (binning a big shard is minutes of progress)."""
    feats, label, weight = opts["input_cols"], opts["label_col"], opts.get("weight_col")
    reads = [0]

    def on_read() -> None:
        reads[0] += 1
        on_chunk(reads[0], len(pieces))

    def column(name: str) -> np.ndarray:
        return np.concatenate([float32_column(read_cached(p).column(name)) for p in pieces])
    y = finite_labels(column(label), label, name)
    return lgb.Dataset([ChunkSequence(p, feats, on_read if on_chunk else None) for p in pieces], label=y,
                       weight=column(weight) if weight else None, feature_name=feats,
                       categorical_feature=_categorical(opts), reference=reference, free_raw_data=True)


def _datasets(data: RankData, opts: dict, on_chunk: Callable[[str, int, int], None] | None = None
              ) -> tuple[list[lgb.Dataset], list[str]]:
    """(train, eval) Datasets, in core from Arrow or out of core from cached chunks."""
    def chunked(name: str, ref=None) -> lgb.Dataset:
        tell = None if on_chunk is None else (lambda i, n: on_chunk(name, i, n))
        return _chunked_dataset(data.cached[name], opts, ref, tell, name)
    make = (chunked if data.cached
            else (lambda name, ref=None: _dataset(data.tables[name], opts, ref, name)))
    names = list(data.cached or data.tables)
    dtrain = make("train")
    sets, labels = [dtrain], ["train"]
    if "eval" in names:
        sets.append(make("eval", dtrain))
        labels.append("eval")
    return sets, labels


def network_params(payload: dict, shared: dict, timeout: float) -> dict:
    rdv, world = payload["rendezvous"], payload["rendezvous"]["world_size"]
    if world == 1:
        return {}
    hosts = [m.rsplit(":", 1)[0] for m in rdv["machines"]]
    ports = [int(shared[f"listen_port_{r}"]) for r in range(world)]
    return {"machines": ",".join(f"{h}:{p}" for h, p in zip(hosts, ports)), "num_machines": world,
            "local_listen_port": ports[payload["rank"]], "time_out": max(1, int(timeout // 60)),
            "pre_partition": True}


def train_params(payload: dict, settings: Settings, shared: dict, emitter: Emitter) -> dict:
    params = dict(payload["spec"]["params"])
    params.setdefault("num_threads", settings.worker_cpus or os.cpu_count() or 1)
    params.setdefault("verbose", -1)
    device = str(params.pop("device_type", params.pop("device", "cpu"))).lower()
    if device in _GPU_DEVICES or payload.get("use_gpu"):
        if payload["rank"] == 0:
            emitter.emit("eval", line="[gangway] LightGBM's PyPI wheel has no distributed GPU learner: "
                                      "training on the CPUs of the gang's hosts")
    params["device_type"] = "cpu"
    if payload["rendezvous"]["world_size"] > 1 and params.get("tree_learner", "serial") not in PARALLEL_LEARNERS:
        params["tree_learner"] = "data"
    params.update(network_params(payload, shared, settings.rendezvous_timeout))
    return params


def _relay(emitter: Emitter, rank: int, total: int, every: int | None, checkpoints: BoosterCheckpoints | None,
           checkpoint_every: int, checkpoint_seconds: float = 0.0):
    state = {"t": time.perf_counter(), "line": "", "printed": True}
    state["checkpointed"] = state["t"]

    def callback(env: lgb.callback.CallbackEnv) -> None:
        latest = {f"{d}-{m}": float(v) for d, m, v, *_ in env.evaluation_result_list or []}
        done = env.iteration + 1   # LightGBM counts init_model's rounds in env.iteration
        now = time.perf_counter()
        emitter.emit("progress", droppable=True, iter=done, total=total, metrics=latest,
                     iter_seconds=now - state["t"])
        state["t"] = now
        state["line"] = f"[{env.iteration}]\t" + "\t".join(f"{k}:{v:.5f}" for k, v in latest.items())
        state["printed"] = False
        if rank == 0 and every and (env.iteration % every == 0 or done == total):
            emitter.emit("eval", line=state["line"])
            state["printed"] = True
        if checkpoints is not None and checkpoint_due(done, total, checkpoint_every, now - state["checkpointed"],
                                                      checkpoint_seconds):
            checkpoints.save_async(done, env.model.model_to_string().encode())
            state["checkpointed"] = now

    def finish() -> None:
        """The last round's line, when early stopping ended training between two printed lines."""
        if rank == 0 and every and not state["printed"] and state["line"]:
            emitter.emit("eval", line=state["line"])

    callback.order = 25   # after record_evaluation (20), before early stopping (30), which ends the last round
    callback.finish = finish
    return callback


def train(prep: Prepared, emitter: Emitter, shared: dict) -> dict:
    p, opts = prep.payload, prep.payload["spec"]["train"]
    rank, rounds = p["rank"], int(opts["num_boost_round"])
    params = train_params(p, prep.settings, shared, emitter)
    t0 = time.perf_counter()
    valid_sets, names = _datasets(prep.data, opts, matrix_progress(emitter))
    dtrain = valid_sets[0]
    evals_result: dict = {}
    ckpt = _checkpoints(prep, emitter)
    init_model, done_before = None, int(shared.get("resume_rounds") or 0)
    if shared.get("resume_key"):   # a retry: every rank resumes from the checkpoint rank 0 chose
        init_model = lgb.Booster(model_str=ckpt.load(shared["resume_key"]).decode())
        if rank == 0:
            emitter.emit("eval", line=f"[gangway] resuming from the checkpoint after round {done_before}")
    relay = _relay(emitter, rank, rounds, opts.get("verbose_eval"), ckpt if rank == 0 else None,
                   prep.settings.checkpoint_rounds, prep.settings.checkpoint_seconds)
    callbacks = [lgb.record_evaluation(evals_result), relay]
    if opts.get("early_stopping_rounds"):
        callbacks.append(lgb.early_stopping(int(opts["early_stopping_rounds"]), first_metric_only=True,
                                            verbose=False))
    # The training set is evaluated only when the user watches the lines (verbose_eval): a pass a round.
    asked = [(d, n) for d, n in zip(valid_sets, names) if n != "train" or opts.get("verbose_eval")]
    booster = lgb.train(params, dtrain, num_boost_round=rounds - done_before, valid_sets=[d for d, _ in asked],
                        valid_names=[n for _, n in asked], callbacks=callbacks, init_model=init_model)
    relay.finish()
    ckpt.flush()
    trees = json.dumps(booster.dump_model()["tree_info"], sort_keys=True)
    summary = {"model_sha256": hashlib.sha256(trees.encode()).hexdigest(),
               "num_boosted_rounds": booster.current_iteration(), "best_iteration": booster.best_iteration,
               "train_seconds": time.perf_counter() - t0, "resumed_from_round": done_before}
    if rank == 0:
        with open(os.path.join(p["workdir"], "model.txt"), "w") as f:
            f.write(booster.model_to_string())
        with open(os.path.join(p["workdir"], "eval_results.json"), "w") as f:
            json.dump(evals_result, f)
    booster.free_network()   # close the sockets before the child reports done
    return summary
