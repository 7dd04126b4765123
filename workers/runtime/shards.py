"""Fetching a rank's data: its contiguous shard (or the whole set) through the host's chunk cache."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow as pa

from common.datasets import ChunkCache, DatasetReader
from common.settings import Settings
from common.store import S3Store


@dataclass
class RankData:
    tables: dict[str, pa.Table]
    bytes_fetched: int = 0
    bytes_cached: int = 0
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"rows": {k: t.num_rows for k, t in self.tables.items()},
                "bytes_fetched": self.bytes_fetched, "bytes_cached": self.bytes_cached,
                "fetch_seconds": self.seconds, "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
                "shard_nbytes": sum(t.nbytes for t in self.tables.values())}


_stores: dict[Settings, S3Store] = {}


def warm_store(settings: Settings) -> S3Store:
    """The child's S3 client, built while it waits as a standby (boto3 costs ~0.4 s to start)."""
    if settings not in _stores:
        _stores[settings] = S3Store(settings)
    return _stores[settings]


def make_reader(settings: Settings) -> DatasetReader:
    cache = ChunkCache(os.path.join(settings.home, "chunk-cache"), settings.cache_bytes)
    return DatasetReader(warm_store(settings), cache, threads=settings.fetch_threads, write_behind=True)


def fetch_datasets(settings: Settings, datasets: dict[str, dict], world_size: int, rank: int) -> RankData:
    """Each named dataset: this rank's shard when ``sharded``, else all of it."""
    reader = make_reader(settings)
    tables = {}
    for name, ref in datasets.items():
        if ref.get("sharded", True):
            tables[name] = reader.read(ref["uri"], world_size=world_size, rank=rank, equal=ref.get("equal", False))
        else:
            tables[name] = reader.read(ref["uri"])
    st = reader.stats
    return RankData(tables, st.bytes_fetched, st.bytes_cached, st.seconds, st.cache_hits, st.cache_misses)
