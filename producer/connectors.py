"""Data connectors: lazy handles on tabular data, materialised once into the store."""
from __future__ import annotations

import os
import threading
from typing import Any
from collections.abc import Sequence

import pyarrow as pa

from common.datasets import (
    ChunkCache,
    DatasetReader,
    WriteResult,
    read_manifest,
    write_dataset,
)
from common.errors import DatasetError
from common.manifest import Manifest
from common.settings import Settings
from common.store import ObjectStore, S3Store, parse_s3_uri


class DataConnector:
    """Tabular data for training. Every rank of an XGBoost job gets a shard of it; inside
    a PyTorch ``train_func`` a plain ``DataConnector`` gives every rank all of it."""

    sharded = False

    def __init__(self, *, table: pa.Table | None = None, parquet: Sequence[str] | None = None,
                 uri: str | None = None, name: str = "") -> None:
        self._table = table
        self._parquet = list(parquet) if parquet else None
        self._uri = uri
        self._name = name
        self._materialised: dict[tuple, WriteResult] = {}
        self._lock = threading.Lock()

    # constructors ---------------------------------------------------------
    @classmethod
    def from_arrow(cls, table: pa.Table | pa.RecordBatch, **kw) -> DataConnector:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise TypeError(f"from_arrow expects a pyarrow.Table, got {type(table).__name__}")
        return cls(table=table, **kw)

    @classmethod
    def from_pandas(cls, df, **kw) -> DataConnector:
        import pandas as pd
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"from_pandas expects a pandas.DataFrame, got {type(df).__name__}")
        return cls(table=pa.Table.from_pandas(df, preserve_index=False), **kw)

    @classmethod
    def from_dataframe(cls, obj: Any, **kw) -> DataConnector:
        """pandas, polars, pyarrow, or anything exposing ``__arrow_c_stream__``."""
        if isinstance(obj, DataConnector):
            return obj
        if isinstance(obj, (pa.Table, pa.RecordBatch)):
            return cls.from_arrow(obj, **kw)
        mod = type(obj).__module__.split(".")[0]
        if mod == "pandas":
            return cls.from_pandas(obj, **kw)
        if hasattr(obj, "to_arrow") and mod == "polars":
            return cls.from_arrow(obj.to_arrow(), **kw)
        if hasattr(obj, "__arrow_c_stream__"):
            return cls.from_arrow(pa.table(obj), **kw)
        raise TypeError(f"cannot make a DataConnector from {type(obj).__module__}.{type(obj).__name__}: "
                        "expected a pandas/polars DataFrame, a pyarrow Table, or an object with "
                        "__arrow_c_stream__")

    @classmethod
    def from_parquet(cls, path: str | Sequence[str], **kw) -> DataConnector:
        paths = [path] if isinstance(path, str) else list(path)
        if not paths:
            raise ValueError("from_parquet needs at least one path")
        return cls(parquet=paths, **kw)

    @classmethod
    def from_sql(cls, query: str, con=None, **kw) -> DataConnector:
        """The result of ``query`` on a DuckDB connection (default: DuckDB's in-process default)."""
        import duckdb
        con = con if con is not None else duckdb.default_connection()
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"from_sql needs a query string, got {query!r}")
        try:
            # con.sql() gives a relation whose Arrow export avoids the DB-API copy.
            rel = con.sql(query) if hasattr(con, "sql") else con.execute(query)
            fetch = next(getattr(rel, m) for m in ("to_arrow_table", "fetch_arrow_table", "arrow")
                         if hasattr(rel, m))
            table = fetch()
        except duckdb.Error as exc:
            raise DatasetError(f"query failed: {query!r}: {exc}") from exc
        if isinstance(table, pa.RecordBatchReader):
            table = table.read_all()
        return cls.from_arrow(table, **kw)

    @classmethod
    def from_uri(cls, uri: str, **kw) -> DataConnector:
        """A dataset already in the store (``s3://bucket/datasets/<hash>/``): nothing is uploaded."""
        parse_s3_uri(uri)
        return cls(uri=uri.rstrip("/") + "/", **kw)

    # reading --------------------------------------------------------------
    def _settings(self, settings: Settings | None) -> Settings:
        return settings or Settings.from_env()

    def to_arrow(self, settings: Settings | None = None, limit: int | None = None) -> pa.Table:
        if self._table is not None:
            return self._table if limit is None else self._table.slice(0, limit)
        if self._parquet is not None:
            table = _read_parquet(self._parquet, self._settings(settings))
            return table if limit is None else table.slice(0, limit)
        s = self._settings(settings)
        reader = DatasetReader(S3Store(s), ChunkCache(os.path.join(s.home, "chunk-cache"), s.cache_bytes))
        return reader.read(self._uri) if limit is None else reader.head(self._uri, limit)

    def to_pandas(self, limit: int | None = None, settings: Settings | None = None):
        return self.to_arrow(settings, limit=limit).to_pandas()

    def to_torch_dataset(self, *, batch_size: int | None = None, shuffle: bool = False,
                         drop_last_batch: bool = True, seed: int = 0):
        """An ``IterableDataset`` of ``dict[column -> tensor]`` (see ``ArrowTorchDataset``)."""
        from producer.torch_data import ArrowTorchDataset
        rank = 0
        try:
            from workers.runtime.torch_context import current
            rank = current().get_rank()
        except RuntimeError:
            pass
        return ArrowTorchDataset(self.to_arrow(), batch_size=batch_size, shuffle=shuffle,
                                 drop_last_batch=drop_last_batch, seed=seed, rank=rank)

    # materialisation ------------------------------------------------------
    def materialise(self, store: ObjectStore, settings: Settings) -> WriteResult:
        """Upload once (content-addressed); a connector already in the store uploads nothing."""
        key = (id(store), settings.data_bucket, settings.chunk_rows)
        with self._lock:
            if key in self._materialised:
                cached = self._materialised[key]
                return WriteResult(cached.uri, cached.manifest, 0, 0.0)
            if self._uri is not None:
                manifest = read_manifest(store, self._uri)
                result = WriteResult(self._uri, manifest, 0, 0.0)
            else:
                result = write_dataset(self.to_arrow(settings), store, settings.data_bucket,
                                       chunk_rows=settings.chunk_rows, threads=settings.fetch_threads)
            self._materialised[key] = result
            return result

    def manifest(self, store: ObjectStore, settings: Settings) -> Manifest:
        return self.materialise(store, settings).manifest

    def __repr__(self) -> str:
        src = ("table" if self._table is not None else "parquet" if self._parquet else f"uri={self._uri}")
        return f"{type(self).__name__}({src})"


class ShardedDataConnector(DataConnector):
    """A connector whose rows are split across ranks; ``get_shard()`` in a training function
    gives this rank's part. ``equal=True`` trims shards to equal row counts."""

    sharded = True

    def __init__(self, *, equal: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.equal = equal
        self._shard: DataConnector | None = None

    def get_shard(self) -> DataConnector:
        """This rank's part of the data (inside a ``train_func`` run by PyTorchDistributor)."""
        if self._shard is None:
            raise RuntimeError("get_shard() is only available inside a train_func run by PyTorchDistributor")
        return self._shard


def _expand(paths: list[str]) -> list[str]:
    import glob
    out = []
    for p in paths:
        if not p.startswith("s3://") and any(ch in p for ch in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise DatasetError(f"no parquet files match {p!r}")
            out.extend(found)
        else:
            out.append(p)
    return out


def _read_parquet(paths: list[str], settings: Settings) -> pa.Table:
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs
    tables = []
    for p in _expand(paths):
        try:
            if p.startswith("s3://"):
                bucket, key = parse_s3_uri(p)
                host = settings.s3_endpoint.split("://", 1)[-1]
                scheme = "https" if settings.s3_secure or settings.s3_endpoint.startswith("https") else "http"
                s3 = pafs.S3FileSystem(access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                                       endpoint_override=host, scheme=scheme, region=settings.s3_region)
                tables.append(pq.read_table(f"{bucket}/{key}", filesystem=s3))
            else:
                tables.append(pq.read_table(p))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read parquet {p!r}: {exc}") from exc
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"parquet files {paths} have incompatible schemas: {exc}") from exc
