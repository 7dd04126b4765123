"""PyTorch inside the training child: env for torch.distributed, get_context(), the user's train_func."""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field

from common.settings import Settings
from common.signing import verify_blob
from common.store import parse_s3_uri
from workers.runtime import torch_context
from workers.runtime.events import Emitter
from workers.runtime.netif import interface_of
from workers.runtime.pickled_code import restore_filenames
from workers.runtime.ports import first_free_port
from workers.runtime.shards import RankData, map_datasets, warm_store


CHECKPOINT_MARKER = ".gangway-complete.json"   # written last: the checkpoint folder is whole


@dataclass
class Prepared:
    payload: dict
    settings: Settings
    data: RankData
    func: object = None
    published: dict = field(default_factory=dict)

    def fetch_summary(self) -> dict:
        return {**self.data.summary(), "publish": self.published}


def free_master_port(settings: Settings) -> int:
    lo, hi = settings.port_block
    return first_free_port(settings.worker_host, [lo, *range(lo + 3, hi + 1)], "MASTER_PORT",
                           f"GANGWAY_WORKER_PORTS={settings.worker_ports}")


def prepare(payload: dict, settings: Settings) -> Prepared:
    import cloudpickle
    spec, rank = payload["spec"], payload["rank"]
    world = payload["rendezvous"]["world_size"]
    bucket, key = parse_s3_uri(spec["train"]["func_uri"])
    blob = warm_store(settings).get(bucket, key)
    verify_blob(blob, key)   # the signed spec names the blob by its hash: nothing else is unpickled
    try:
        func = restore_filenames(cloudpickle.loads(blob))   # tracebacks name the user's file
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"train_func needs module {exc.name!r}, which worker {settings.worker_id or '?'} cannot import: install "
            "it on the fleet's workers, or keep it as a file beside your script (gangway ships modules outside "
            "site-packages by value)", name=exc.name) from exc
    prep = Prepared(payload, settings, map_datasets(settings, spec["datasets"], world, rank,
                                                     os.path.join(payload["workdir"], "shard")), func)
    if rank == 0:
        prep.published["master_port"] = free_master_port(settings)
    return prep


def topology(machines: list[str], rank: int) -> tuple[int, int, int]:
    """(local_rank, local_world_size, node_rank) from the gang's addresses in rank order."""
    hosts = [m.rsplit(":", 1)[0] for m in machines]
    order = list(dict.fromkeys(hosts))
    mine = hosts[rank]
    same = [r for r, h in enumerate(hosts) if h == mine]
    return same.index(rank), len(same), order.index(mine)


def _connectors(prep: Prepared) -> dict:
    from producer.connectors import DataConnector, ShardedDataConnector
    out = {}
    for name, ref in prep.payload["spec"]["datasets"].items():
        table = prep.data.tables[name]
        if ref.get("sharded"):
            conn = ShardedDataConnector(uri=ref["uri"], equal=ref.get("equal", False))
            conn._shard = DataConnector.from_arrow(table)
            out[name] = conn
        else:
            out[name] = DataConnector.from_arrow(table)
    return out


class Checkpoints:
    """Rank 0's checkpoint uploads under ``{stage}/checkpoints/{job_id}/NNNNNN-<token>/``, and the newest's
    download.

    A checkpoint is complete once its marker (``.gangway-complete.json``: attempt, token, files) is written,
    after every file; an upload cut short (an abort, a killed child, a store error) leaves a folder without
    one, which ``latest()`` skips and no later checkpoint reuses. The folder names its attempt, so a child
    outliving its attempt never writes into a later attempt's folder; its supervisor records each complete
    checkpoint only while the attempt is current, and ``latest()`` takes only this attempt's own or those an
    earlier attempt recorded (``checkpoints_recorded`` in the payload, read by the supervisor at start)."""

    def __init__(self, prep: Prepared, emitter: Emitter, store=None) -> None:
        self.store = store or warm_store(prep.settings)
        stage = prep.payload["spec"]["train"]["artifact_stage_location"]
        self.bucket, base = parse_s3_uri(stage.rstrip("/") + "/")
        self.prefix = f"{base}checkpoints/{prep.payload['job_id']}/"
        self.workdir = prep.payload["workdir"]
        self.attempt = {"attempt": prep.payload.get("attempt"), "token": prep.payload.get("token")}
        recorded = prep.payload.get("checkpoints_recorded")
        self.recorded = None if recorded is None else set(recorded)   # None: no record given (all complete count)
        self.own: set[str] = set()
        self.emitter = emitter
        self.location = f"s3://{self.bucket}/{self.prefix}"
        self.uploaded = False

    def _folders(self) -> tuple[list[str], set[str]]:
        """Every checkpoint folder (sorted) and the complete ones."""
        rels = [k[len(self.prefix):] for k in self.store.list(self.bucket, self.prefix)]
        seqs = sorted({r.split("/", 1)[0] for r in rels if r.split("/", 1)[0][:6].isdigit()}, key=_seq)
        complete = {r.split("/", 1)[0] for r in rels if r.endswith("/" + CHECKPOINT_MARKER)}
        return seqs, complete

    def _existing(self) -> list[str]:
        seqs, complete = self._folders()
        return [s for s in seqs if s in complete and (self.recorded is None or s in self.recorded or s in self.own)]

    def upload(self, folder: str, metrics: dict) -> str:
        seqs, _ = self._folders()
        seq = f"{(_seq(seqs[-1]) if seqs else -1) + 1:06d}-{self.attempt['token']}"   # past any folder, complete or not
        files = []
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, folder)
                self.store.put_file(self.bucket, f"{self.prefix}{seq}/{rel}", path)
                files.append(rel)
        self.store.put(self.bucket, f"{self.prefix}{seq}/{CHECKPOINT_MARKER}",
                       json.dumps({**self.attempt, "files": sorted(files)}).encode())
        self.uploaded = True
        self.own.add(seq)
        self.emitter.emit("checkpoint", uri=f"{self.location}{seq}/", metrics=metrics, folder=seq)
        flush = getattr(self.emitter, "flush", None)
        if flush is not None:   # recorded by the supervisor even if this process is killed right after
            flush()
        return f"{self.location}{seq}/"

    def latest(self) -> str | None:
        seqs = self._existing()
        if not seqs:
            return None
        target = os.path.join(self.workdir, f"restored-{seqs[-1]}")
        os.makedirs(target, exist_ok=True)
        for key in self.store.list(self.bucket, f"{self.prefix}{seqs[-1]}/"):
            rel = key[len(f"{self.prefix}{seqs[-1]}/"):]
            if rel == CHECKPOINT_MARKER:
                continue
            dest = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            self.store.get_to_file(self.bucket, key, dest)
        return target


def _seq(folder: str) -> int:
    """The number a checkpoint folder (``NNNNNN`` or ``NNNNNN-<token>``) starts with."""
    return int(folder.split("-", 1)[0])


def visible_gpus(payload: dict, local_rank: int) -> tuple[list[str], int]:
    """(``CUDA_VISIBLE_DEVICES``, this rank's device index). One GPU a rank: this host's gang GPUs in
    local-rank order, ``cuda:{local_rank}`` being its own (NCCL sees its peers' devices). Several GPUs a
    rank (``num_gpus=K``): exactly its worker's K GPUs, ``cuda:0`` … ``cuda:K-1``."""
    own = payload.get("gpus") or []
    if len(own) > 1:
        return list(own), 0
    return list(payload.get("host_gpus") or []), local_rank


def _pin_gpus(prep: Prepared, local_rank: int) -> None:
    gpus, device = visible_gpus(prep.payload, local_rank)
    if prep.payload.get("use_gpu") and gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        import torch
        torch.cuda.set_device(device)


def _set_threads(n: int) -> None:
    """torch's intra-op pool to ``n`` threads. Setting OMP_NUM_THREADS is not enough in a child forked
    from the zygote: the OpenMP runtime XGBoost and LightGBM loaded there read the environment when it
    was loaded, so torch would start with a thread per core (2 ranks x 2 threads on 2 cores: 8x slower steps)."""
    import torch
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def train(prep: Prepared, emitter: Emitter, shared: dict) -> dict:
    p, rdv = prep.payload, prep.payload["rendezvous"]
    rank, world = p["rank"], rdv["world_size"]
    local_rank, local_world, node_rank = topology(list(rdv["machines"]), rank)
    master_port = int(shared.get("master_port", rdv["master_port"]))
    os.environ.update({"MASTER_ADDR": rdv["master_addr"], "MASTER_PORT": str(master_port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                       "LOCAL_WORLD_SIZE": str(local_world), "NODE_RANK": str(node_rank),
                       "GROUP_RANK": str(node_rank)})
    os.environ.setdefault("OMP_NUM_THREADS", str(prep.settings.worker_cpus or 1))
    _set_threads(int(os.environ["OMP_NUM_THREADS"]))
    ifname = interface_of(prep.settings.worker_host)
    if ifname:   # gloo (and NCCL's bootstrap) on the interface peers dial, not the hostname's guess
        os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", ifname)
    _pin_gpus(prep, local_rank)
    metrics: dict = {}

    def on_metrics(m: dict) -> None:
        metrics.update(m)
        emitter.emit("metrics", droppable=False, metrics=m)

    ckpt = Checkpoints(prep, emitter)
    ctx = torch_context.TrainingContext(
        rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, node_rank=node_rank,
        master_addr=rdv["master_addr"], master_port=master_port, use_gpu=bool(p.get("use_gpu")),
        hyper_params=p["spec"]["train"].get("hyper_params") or {}, dataset_map=_connectors(prep),
        workdir=p["workdir"], on_metrics=on_metrics, on_checkpoint=ckpt.upload, latest_checkpoint=ckpt.latest)
    torch_context.install(ctx)
    t0 = time.perf_counter()
    try:
        prep.func()
    finally:
        torch_context.install(None)
        _destroy_process_group()
    return {"metrics": metrics if rank == 0 else {}, "train_seconds": time.perf_counter() - t0,
            "checkpoint_location": ckpt.location if ckpt.uploaded else None,
            "model_files": sorted(os.listdir(ctx.get_model_dir())) if rank == 0 else []}


def _destroy_process_group() -> None:
    with contextlib.suppress(Exception):   # the user's group is theirs; never mask their outcome
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
