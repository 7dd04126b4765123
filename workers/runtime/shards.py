"""Fetching a rank's data: its contiguous shard (or the whole set) through the host's chunk cache."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import pyarrow as pa

from common.datasets import (
    CachedSlice,
    ChunkCache,
    DatasetReader,
    empty_table,
    read_cached,
    read_manifest_cached,
)
from common.manifest import Manifest, assign_shard
from common.settings import Settings
from common.store import S3Store
from workers.runtime.memory import (
    LGB_SAMPLE_ROWS,
    HoldMode,
    MemoryPlan,
    ShardSize,
    plan_gbdt,
    plan_stream,
    worker_budget,
    worker_tree_memory,
)

log = logging.getLogger(__name__)


@dataclass
class RankData:
    tables: dict[str, pa.Table]                      # in core: the Arrow shards
    cached: dict[str, list[CachedSlice]] = field(default_factory=dict)   # out of core: chunk files
    bytes_fetched: int = 0
    bytes_cached: int = 0
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        rows = {k: t.num_rows for k, t in self.tables.items()}
        rows.update({k: sum(p.length for p in pieces) for k, pieces in self.cached.items()})
        return {"rows": rows, "bytes_fetched": self.bytes_fetched, "bytes_cached": self.bytes_cached,
                "fetch_seconds": self.seconds, "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
                "shard_nbytes": sum(t.nbytes for t in self.tables.values()), **self.extra}


_stores: dict[Settings, S3Store] = {}


def warm_store(settings: Settings) -> S3Store:
    """The child's S3 client, built while it waits as a standby (importing and building one costs ~0.1 s)."""
    if settings not in _stores:
        _stores[settings] = S3Store(settings)
    return _stores[settings]


def manifest_dir(settings: Settings) -> str:
    """Where this host keeps the manifests of content-addressed datasets its ranks read."""
    return os.path.join(settings.home, "manifests")


def make_reader(settings: Settings) -> DatasetReader:
    cache = ChunkCache(os.path.join(settings.home, "chunk-cache"), settings.cache_bytes)
    return DatasetReader(warm_store(settings), cache, threads=settings.fetch_threads, write_behind=True)


def fetch_datasets(settings: Settings, datasets: dict[str, dict], world_size: int, rank: int,
                   manifests: dict[str, Manifest] | None = None) -> RankData:
    """Each named dataset: this rank's shard when ``sharded``, else all of it."""
    reader = make_reader(settings)
    manifests = manifests or {}
    tables = {}
    for name, ref in datasets.items():
        if ref.get("sharded", True):
            tables[name] = reader.read(ref["uri"], manifests.get(name), world_size=world_size, rank=rank,
                                       equal=ref.get("equal", False))
        else:
            tables[name] = reader.read(ref["uri"], manifests.get(name))
    st = reader.stats
    return RankData(tables, {}, st.bytes_fetched, st.bytes_cached, st.seconds, st.cache_hits, st.cache_misses)


def cache_datasets(settings: Settings, datasets: dict[str, dict], manifests: dict[str, Manifest],
                   world_size: int, rank: int, pin_dir: str | None = None) -> RankData:
    """Like ``fetch_datasets``, but leaves each shard on disk (out-of-core training): chunk files of
    the host's cache, linked into ``pin_dir`` (the rank's folder) so no other rank's trim removes them."""
    reader = make_reader(settings)
    cached = {}
    for name, ref in datasets.items():
        sharded = ref.get("sharded", True)
        cached[name] = reader.cache_shard(ref["uri"], manifests[name], world_size=world_size if sharded else 1,
                                          rank=rank if sharded else 0, equal=ref.get("equal", False),
                                          pin_dir=pin_dir)
    st = reader.stats
    return RankData({}, cached, st.bytes_fetched, st.bytes_cached, st.seconds, st.cache_hits, st.cache_misses)


def map_datasets(settings: Settings, datasets: dict[str, dict], world_size: int, rank: int,
                 pin_dir: str | None = None) -> RankData:
    """Each dataset as a table over memory-mapped cached chunk files: nothing is copied to the heap,
    pages come from disk as they are read and the kernel can drop them again, so a shard larger
    than memory can be iterated (PyTorch: ``get_shard()``, ``to_torch_dataset()``)."""
    store = warm_store(settings)
    manifests = {name: read_manifest_cached(store, ref["uri"], manifest_dir(settings))
                 for name, ref in datasets.items()}
    plan = plan_stream(_shard_size(datasets, manifests, world_size, rank, 0), worker_budget(settings),
                       worker_tree_memory())
    data = cache_datasets(settings, datasets, manifests, world_size, rank, pin_dir)
    data.tables = {name: _mapped_table(pieces, manifests[name]) for name, pieces in data.cached.items()}
    data.cached = {}
    data.extra["memory"] = {"mode": "mapped", "budget": plan.budget, "in_use": plan.in_use,
                            "window": plan.external_need}
    return data


def _mapped_table(pieces: list[CachedSlice], manifest: Manifest) -> pa.Table:
    tables = [read_cached(p) for p in pieces]
    return pa.concat_tables(tables) if tables else empty_table(manifest)


def shard_bytes_and_rows(manifest: Manifest, world_size: int, rank: int, equal: bool = False
                         ) -> tuple[int, int, int]:
    """Arrow bytes (pro rata of the chunks' rows), rows, and the largest chunk's bytes of a rank's shard."""
    slices = assign_shard([c.rows for c in manifest.chunks], world_size, rank, equal)
    chunks = [manifest.chunks[s.chunk] for s in slices]
    nbytes = sum(c.nbytes * s.length // max(c.rows, 1) for c, s in zip(chunks, slices))
    return nbytes, sum(s.length for s in slices), max((c.nbytes for c in chunks), default=0)


def _pin_dir(payload: dict) -> str | None:
    """The rank's own folder for its shard's chunk files (a subfolder of workdir: never uploaded)."""
    return os.path.join(payload["workdir"], "shard") if payload.get("workdir") else None


def _shard_size(datasets: dict[str, dict], manifests: dict[str, Manifest], world: int, rank: int, features: int,
                max_bin: int = 256, sample_rows: int = LGB_SAMPLE_ROWS) -> ShardSize:
    """This rank's part of every dataset, summed (a dataset not ``sharded`` counts whole)."""
    nbytes = rows = largest = 0
    for name, ref in datasets.items():
        sharded = ref.get("sharded", True)
        b, r, big = shard_bytes_and_rows(manifests[name], world if sharded else 1, rank if sharded else 0,
                                         ref.get("equal", False))
        nbytes, rows, largest = nbytes + b, rows + r, max(largest, big)
    return ShardSize(nbytes=nbytes, rows=rows, features=features, largest_chunk=largest, max_bin=max_bin,
                     sample_rows=sample_rows)


def plan_memory(payload: dict, settings: Settings, datasets: dict[str, dict], manifests: dict[str, Manifest],
                world: int, *, raw_in_core: bool = True, sketch: bool = False,
                bins_in_memory: bool = False, bin_sample: bool = False) -> MemoryPlan:
    """In core or out of core for this rank's part of every dataset, within the worker's budget."""
    spec = payload["spec"]
    params = spec["params"]
    sample_rows = params.get("bin_construct_sample_cnt", params.get("subsample_for_bin", LGB_SAMPLE_ROWS))
    size = _shard_size(datasets, manifests, world, payload["rank"], len(spec["train"]["input_cols"]),
                       int(params.get("max_bin", 256)), int(sample_rows))
    return plan_gbdt(size, worker_budget(settings), worker_tree_memory(), settings.out_of_core,
                     raw_in_core=raw_in_core, sketch=sketch, bins_in_memory=bins_in_memory, bin_sample=bin_sample)


def fetch_planned(payload: dict, settings: Settings, datasets: dict[str, dict], world: int, *,
                  external_ok: bool = True, stream_in_core: bool = False, sketch: bool = False,
                  bins_in_memory: bool = False, bin_sample: bool = False) -> RankData:
    """The rank's data, in memory when the plan says it fits, else as chunk files in the disk cache
    (``external_ok=False``: always in memory, e.g. where the framework cannot stream this time).
    ``stream_in_core``: chunk files either way (the framework builds its in-core matrix chunk by
    chunk from them, so the raw shard is never whole in memory); ``extra["memory"]["mode"]`` says
    which matrix to build."""
    store = warm_store(settings)
    manifests = {name: read_manifest_cached(store, ref["uri"], manifest_dir(settings))
                 for name, ref in datasets.items()}
    plan = plan_memory(payload, settings, datasets, manifests, world, raw_in_core=not stream_in_core, sketch=sketch,
                       bins_in_memory=bins_in_memory, bin_sample=bin_sample)
    log.info("job %s rank %d: %s", payload["job_id"], payload["rank"], plan.describe())
    external = plan.mode == HoldMode.EXTERNAL and external_ok
    if external or stream_in_core:
        data = cache_datasets(settings, datasets, manifests, world, payload["rank"], _pin_dir(payload))
        # what the Arrow tables would hold in memory
        data.extra["shard_nbytes"] = _shard_size(datasets, manifests, world, payload["rank"], 0).nbytes
    else:
        data = fetch_datasets(settings, datasets, world, payload["rank"], manifests)
    data.extra["memory"] = {"mode": HoldMode.EXTERNAL.value if external else HoldMode.IN_CORE.value,
                            "budget": plan.budget, "in_use": plan.in_use, "in_core_need": plan.in_core_need,
                            "external_need": plan.external_need}
    return data
