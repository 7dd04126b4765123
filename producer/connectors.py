"""Data connectors: lazy handles on tabular data, materialised once into the store."""
from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from common.categories import decode_table
from common.datasets import (
    ChunkCache,
    DatasetReader,
    WriteResult,
    read_manifest,
    write_batches,
)
from common.ingest import row_bytes, rows_per_chunk
from common.manifest import Manifest
from common.references import reference_parquet
from common.settings import Settings
from common.store import ObjectStore, S3Store, parse_s3_uri
from producer.progress import UploadProgress
from producer.sources import (
    BatchSource,
    lazyframe_source,
    parquet_source,
    sql_source,
    stream_source,
)


DECODE_BYTES = 8 * 1024 ** 2   # of a source batch (see DataConnector._batch_rows)


class DataConnector:
    """Tabular data for training. Every rank of an XGBoost job gets a shard of it; inside
    a PyTorch ``train_func`` a plain ``DataConnector`` gives every rank all of it.

    A connector is lazy: a file, query or stream source is read as batches when it is
    uploaded (``materialise``), chunk by chunk, never as a whole table."""

    sharded = False

    def __init__(self, *, table: pa.Table | None = None, parquet: Sequence[str] | None = None,
                 uri: str | None = None, source: BatchSource | None = None, name: str = "",
                 copy: bool | None = None, filesystem=None) -> None:
        self._table = table
        self._parquet = list(parquet) if parquet else None
        self._in_place = (bool(self._parquet) and copy is not True and filesystem is None
                          and all(p.startswith("s3://") for p in self._parquet))
        if source is None and self._parquet is not None:
            source = parquet_source(self._parquet, filesystem)
        self._source = source
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
        """pandas, polars (``DataFrame`` or ``LazyFrame``, streamed), pyarrow, or anything exposing
        ``__arrow_c_stream__`` (read as a stream)."""
        if isinstance(obj, DataConnector):
            return obj
        if isinstance(obj, (pa.Table, pa.RecordBatch)):
            return cls.from_arrow(obj, **kw)
        if isinstance(obj, pa.RecordBatchReader):
            return cls.from_batches(obj, **kw)
        mod = type(obj).__module__.split(".")[0]
        if mod == "pandas":
            return cls.from_pandas(obj, **kw)
        if mod == "polars" and type(obj).__name__ == "LazyFrame":
            return cls(source=lazyframe_source(obj), **kw)
        if hasattr(obj, "to_arrow") and mod == "polars":
            return cls.from_arrow(obj.to_arrow(), **kw)   # in memory already: zero-copy
        if hasattr(obj, "__arrow_c_stream__"):
            return cls(source=stream_source(obj), **kw)
        raise TypeError(f"cannot make a DataConnector from {type(obj).__module__}.{type(obj).__name__}: "
                        "expected a pandas/polars DataFrame, a pyarrow Table, or an object with "
                        "__arrow_c_stream__")

    @classmethod
    def from_batches(cls, batches, schema: pa.Schema | None = None, **kw) -> DataConnector:
        """A ``RecordBatchReader`` or an iterable of ``RecordBatch`` (e.g. a generator), uploaded as it
        is produced. A generator or reader can be read once; ``schema`` is needed if it may be empty."""
        return cls(source=stream_source(batches, schema), **kw)

    @classmethod
    def from_parquet(cls, path: str | Sequence[str], *, copy: bool | None = None, filesystem=None,
                     **kw) -> DataConnector:
        """Files, globs, directories or ``s3://bucket/prefix/`` (or object) paths.

        Parquet in the fleet's store (every path ``s3://``) is used in place: submitting reads the files'
        footers and writes a manifest of their row groups, each file pinned to its size and ETag;
        ranks read their row groups straight from the objects. ``copy=True`` streams the rows into
        chunks of the data bucket instead (as local files always are), for data the fleet should
        not read where it lies. ``filesystem`` (a ``pyarrow.fs`` filesystem: another S3 endpoint or
        other credentials) is read by this process only, so its files are always copied."""
        paths = [path] if isinstance(path, str) else list(path)
        if not paths:
            raise ValueError("from_parquet needs at least one path")
        if copy is False and not all(p.startswith("s3://") for p in paths):
            local = [p for p in paths if not p.startswith("s3://")]
            raise ValueError(f"from_parquet(copy=False) reads parquet in place, which needs s3:// paths in the "
                             f"fleet's store; {local} are local files (leave copy unset to upload them)")
        if copy is False and filesystem is not None:
            raise ValueError("from_parquet(copy=False, filesystem=...): the fleet cannot read a filesystem that "
                             "only this process was given; leave copy unset to upload a copy")
        return cls(parquet=paths, copy=copy, filesystem=filesystem, **kw)

    @classmethod
    def from_sql(cls, query: str, con=None, **kw) -> DataConnector:
        """The result of ``query`` on a DuckDB connection (default: DuckDB's in-process default),
        streamed through its record batch reader."""
        import duckdb
        con = con if con is not None else duckdb.default_connection()
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"from_sql needs a query string, got {query!r}")
        return cls(source=sql_source(query, con), **kw)

    @classmethod
    def from_uri(cls, uri: str, **kw) -> DataConnector:
        """A dataset already in the store (``s3://bucket/datasets/<hash>/``): nothing is uploaded."""
        parse_s3_uri(uri)
        return cls(uri=uri.rstrip("/") + "/", **kw)

    # reading --------------------------------------------------------------
    def _settings(self, settings: Settings | None) -> Settings:
        return settings or Settings.from_env()

    def _stored(self) -> str | None:
        """The URI this connector was uploaded to (a one-shot source is read from there again)."""
        return self._uri or next((r.uri for r in self._materialised.values()), None)

    def schema(self, settings: Settings | None = None) -> pa.Schema | None:
        """The Arrow schema (None for a dataset already in the store: see its manifest)."""
        if self._table is not None:
            return self._table.schema
        if self._source is not None:
            s = self._settings(settings)
            with self._lock:
                return self._source.schema(s, s.chunk_rows)
        return None

    def _batch_rows(self, s: Settings) -> int:
        """Rows per batch read from the source: about ``DECODE_BYTES`` (never more than a chunk), since a
        parquet reader holds a page per column beside the batch it decodes (wide files: hundreds of MiB
        at a chunk's rows). Batches are joined into chunks on the way. A source whose schema needs a
        first batch reads it with ``chunk_rows``."""
        schema = self._source.schema(s, s.chunk_rows)
        return min(rows_per_chunk(schema, s.chunk_rows, s.chunk_bytes), max(1024, DECODE_BYTES // row_bytes(schema)))

    def to_arrow(self, settings: Settings | None = None, limit: int | None = None) -> pa.Table:
        """The whole table in memory (or its first ``limit`` rows): for small data and predictions."""
        if self._table is not None:
            return self._table if limit is None else self._table.slice(0, limit)
        s = self._settings(settings)
        if self._source is not None and (self._source.reiterable or self._stored() is None):
            with self._lock:
                rows = self._batch_rows(s)
                if limit is not None:
                    return self._source.head(s, rows, limit)
                schema = self._source.schema(s, rows)
                table = pa.Table.from_batches(self._source.batches(s, rows), schema=schema)
                if not self._source.reiterable:   # a generator is spent: keep what it gave
                    self._table, self._source = table, None
                return table
        store = _store(s)
        reader = DatasetReader(store, ChunkCache(os.path.join(s.home, "chunk-cache"), s.cache_bytes))
        uri = self._stored()
        # the manifest this connector already read or wrote for ``uri``, as materialise() keeps it
        manifest = next((r.manifest for r in list(self._materialised.values()) if r.uri == uri), None) \
            or read_manifest(store, uri)
        table = reader.read(uri, manifest) if limit is None else reader.head(uri, limit, manifest)
        return decode_table(table, manifest.categories)   # categorical codes read back as categories

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
    def materialise(self, store: ObjectStore, settings: Settings, *, inspect=None, inspect_footer=None,
                    categorical: Sequence[str] = (), categories: dict[str, list] | None = None) -> WriteResult:
        """Upload once (content-addressed, streamed chunk by chunk); a connector already in the store
        uploads nothing. ``inspect`` sees every chunk of an upload (e.g. to check labels on the way);
        ``inspect_footer(uri, FileMetaData)`` every file's metadata of parquet used in place (its
        row-group statistics: no data is read).
        ``categorical`` columns are stored as codes of one mapping (seeded and frozen by ``categories``,
        see ``common.categories``); the same data encoded otherwise is another dataset."""
        seed = json.dumps(sorted(categories.items())) if categories is not None else None
        key = (id(store), settings.data_bucket, settings.chunk_rows, settings.chunk_bytes, tuple(categorical), seed)
        with self._lock:
            if key in self._materialised:
                cached = self._materialised[key]
                return WriteResult(cached.uri, cached.manifest, 0, 0.0)
            if self._uri is not None:
                manifest = read_manifest(store, self._uri)
                result = WriteResult(self._uri, manifest, 0, 0.0)
            elif self._in_place and not categorical:   # codes are assigned at ingest: categoricals are copied
                result = reference_parquet(store, settings.data_bucket, self._parquet, chunk_rows=settings.chunk_rows,
                                           chunk_bytes=settings.chunk_bytes, threads=settings.fetch_threads,
                                           inspect_footer=inspect_footer)
            else:
                result = self._upload(store, settings, inspect, categorical, categories)
            self._materialised[key] = result
            return result

    def _upload(self, store: ObjectStore, settings: Settings, inspect, categorical: Sequence[str] = (),
                categories: dict[str, list] | None = None) -> WriteResult:
        if self._table is not None:
            batches, schema, rows = self._table.to_batches(), self._table.schema, self._table.num_rows
        else:
            schema = self._source.schema(settings, settings.chunk_rows)
            batches, rows = self._source.batches(settings, self._batch_rows(settings)), None
        with UploadProgress(rows, repr(self)) as progress:
            return write_batches(batches, store, settings.data_bucket, chunk_rows=settings.chunk_rows,
                                 chunk_bytes=settings.chunk_bytes, schema=schema, threads=settings.fetch_threads,
                                 memory=settings.upload_memory_bytes, progress=progress,
                                 inspect=inspect, categorical=categorical, categories=categories)

    def manifest(self, store: ObjectStore, settings: Settings) -> Manifest:
        return self.materialise(store, settings).manifest

    def __repr__(self) -> str:
        src = ("table" if self._table is not None else self._source.describe if self._source is not None
               else f"uri={self._uri}")
        if self._in_place:
            src += ", in place"
        return f"{type(self).__name__}({src})"


@functools.lru_cache(maxsize=8)
def _store(settings: Settings) -> S3Store:
    """One S3 client (and its connection pool) per store this process reads, not one per call: submit()
    reads a sample of the data every time (building a client and connecting cost ~5 ms)."""
    return S3Store(settings)


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
