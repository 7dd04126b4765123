"""Where a connector's rows come from: streams of Arrow record batches, never a whole table.

A source is opened each time it is read (parquet files, a SQL query, a polars
``LazyFrame``, an object exposing ``__arrow_c_stream__``); a one-shot source (a
generator, a ``RecordBatchReader``) can be read once. Peeking at the schema or the
first rows keeps the batches read so far, and the next full read starts from them,
so validating a query before its upload does not run it twice.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa

from common.errors import DatasetError
from common.settings import Settings
from common.store import parse_s3_uri

Opener = Callable[[Settings, int], Iterable[pa.RecordBatch]]   # (settings, batch rows) -> batches


class BatchSource:
    """A re-openable (or one-shot) stream of record batches with a peekable head."""

    def __init__(self, opener: Opener, describe: str, *, reiterable: bool = True,
                 schema: pa.Schema | None = None,
                 schema_of: Callable[[Settings], pa.Schema] | None = None) -> None:
        self._open = opener
        self.describe = describe
        self.reiterable = reiterable
        self._schema = schema
        self._schema_of = schema_of   # the schema without reading rows (parquet footers)
        self._peeked: list[pa.RecordBatch] = []
        self._rest: Iterator[pa.RecordBatch] | None = None
        self._opened_once = False

    def _start(self, settings: Settings, batch_rows: int) -> Iterator[pa.RecordBatch]:
        if self._opened_once and not self.reiterable:
            raise DatasetError(f"{self.describe} was already read and can be read only once "
                               "(pass a list, or a function's fresh generator to a new connector)")
        self._opened_once = True
        return iter(self._open(settings, batch_rows))

    def _peek(self, settings: Settings, batch_rows: int, rows: int) -> None:
        """Read batches until ``rows`` are held (or the stream ends), keeping the stream open."""
        if self._rest is None:
            self._rest, self._peeked = self._start(settings, batch_rows), []
        while sum(b.num_rows for b in self._peeked) < max(rows, 1):
            batch = next(self._rest, None)
            if batch is None:
                break
            self._peeked.append(batch)

    def schema(self, settings: Settings, batch_rows: int) -> pa.Schema:
        if self._schema is None and self._schema_of is not None:
            self._schema = self._schema_of(settings)
        if self._schema is None:
            self._peek(settings, batch_rows, 1)
            if not self._peeked:
                raise DatasetError(f"{self.describe} has no batches, so no schema: pass schema=")
            self._schema = self._peeked[0].schema
        return self._schema

    def head(self, settings: Settings, batch_rows: int, rows: int) -> pa.Table:
        self._peek(settings, batch_rows, rows)
        schema = self.schema(settings, batch_rows)
        return pa.Table.from_batches(self._peeked, schema=schema).slice(0, rows)

    def batches(self, settings: Settings, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Every batch: what was peeked first, then the rest of that same open stream."""
        if self._rest is not None:
            peeked, rest = self._peeked, self._rest
            self._peeked, self._rest = [], None
            return itertools.chain(peeked, rest)
        return self._start(settings, batch_rows)


# openers ----------------------------------------------------------------------

def parquet_source(paths: list[str], filesystem=None) -> BatchSource:
    """Files, globs, directories or ``s3://bucket/prefix/``, read file by file and row group by row
    group (``ParquetFile.iter_batches``): memory is one row group, whatever the dataset's size.
    ``filesystem`` (a ``pyarrow.fs`` filesystem, e.g. another S3 endpoint) reads every path instead."""
    return BatchSource(lambda settings, rows: _parquet_batches(paths, settings, rows, filesystem),
                       f"parquet {paths}",
                       schema_of=lambda settings: _parquet_schemas(paths, settings, filesystem)[0])


def sql_source(query: str, con) -> BatchSource:
    """A DuckDB query, read through its record batch reader (the result is never materialised).
    The query is bound now, so a wrong table or column fails at once; it runs when read."""
    import duckdb
    try:
        rel = con.sql(query) if hasattr(con, "sql") else None
    except duckdb.Error as exc:
        raise DatasetError(f"query failed: {query!r}: {exc}") from exc

    def opener(settings: Settings, rows: int):
        try:
            if rel is None:   # a bare DB-API cursor: its own batch reader
                yield from con.execute(query).fetch_record_batch(rows)
                return
            reader = rel.to_arrow_reader(rows) if hasattr(rel, "to_arrow_reader") else rel.fetch_arrow_reader(rows)
            yield from reader
        except duckdb.Error as exc:
            raise DatasetError(f"query failed: {query!r}: {exc}") from exc
    return BatchSource(opener, f"query {query!r}")


def lazyframe_source(lf) -> BatchSource:
    """A polars ``LazyFrame``, collected by its streaming engine in batches."""
    def opener(settings: Settings, rows: int):
        if hasattr(lf, "collect_batches"):
            for df in lf.collect_batches(chunk_size=rows):
                yield from df.to_arrow().to_batches()
        else:   # older polars: the streaming engine's whole result, still without a pandas detour
            yield from lf.collect(streaming=True).to_arrow().to_batches(rows)
    return BatchSource(opener, "polars LazyFrame")


def stream_source(obj: Any, schema: pa.Schema | None = None) -> BatchSource:
    """Anything with ``__arrow_c_stream__`` (re-exported on every read), a ``RecordBatchReader``
    (one-shot) or an iterable of record batches (a list is re-readable, a generator is not)."""
    if isinstance(obj, pa.RecordBatchReader):
        return BatchSource(lambda s, rows: obj, "RecordBatchReader", reiterable=False, schema=obj.schema)
    if hasattr(obj, "__arrow_c_stream__"):
        return BatchSource(lambda s, rows: pa.RecordBatchReader.from_stream(obj), type(obj).__name__,
                           schema=schema)
    if isinstance(obj, (list, tuple)):
        return BatchSource(lambda s, rows: list(_check_batches(obj)), "list of batches", schema=schema)
    if isinstance(obj, Iterable):
        return BatchSource(lambda s, rows: _check_batches(obj), "iterable of batches", reiterable=False,
                           schema=schema)
    raise TypeError(f"from_batches expects a RecordBatchReader or an iterable of pyarrow.RecordBatch, "
                    f"got {type(obj).__module__}.{type(obj).__name__}")


def _check_batches(batches: Iterable) -> Iterator[pa.RecordBatch]:
    for i, b in enumerate(batches):
        if isinstance(b, pa.Table):
            yield from b.to_batches()
        elif isinstance(b, pa.RecordBatch):
            yield b
        else:
            raise TypeError(f"item {i} of the batches is a {type(b).__module__}.{type(b).__name__}, "
                            "not a pyarrow.RecordBatch")


# parquet ----------------------------------------------------------------------

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


def s3_filesystem(settings: Settings):
    from pyarrow import fs as pafs
    host = settings.s3_endpoint.split("://", 1)[-1]
    scheme = "https" if settings.s3_secure or settings.s3_endpoint.startswith("https") else "http"
    return pafs.S3FileSystem(access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                             endpoint_override=host, scheme=scheme, region=settings.s3_region)


def parquet_files(paths: list[str], settings: Settings, filesystem=None) -> list[tuple[Any, str]]:
    """(filesystem, path) of every parquet file, in a stable order (it decides the dataset's hash).
    Listed with the filesystem itself: importing ``pyarrow.dataset`` alone costs ~50 MB of RSS."""
    from pyarrow import fs as pafs
    out = []
    for p in _expand(paths):
        try:
            if filesystem is not None:
                fs, path = filesystem, p.removeprefix("s3://").rstrip("/")
            elif p.startswith("s3://"):
                fs, path = s3_filesystem(settings), "/".join(parse_s3_uri(p)).rstrip("/")
            else:
                fs, path = pafs.LocalFileSystem(), os.path.abspath(p)
            files = _list_files(fs, path)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read parquet {p!r}: {exc}") from exc
        if not files:
            raise DatasetError(f"no parquet files under {p!r}")
        out.extend((fs, f) for f in files)
    return out


def _list_files(fs, path: str) -> list[str]:
    from pyarrow import fs as pafs
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{path} does not exist")
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    # like pyarrow.dataset: _SUCCESS, _metadata and hidden files are not data
    return sorted(i.path for i in found if i.type == pafs.FileType.File
                  and not os.path.basename(i.path).startswith(("_", ".")))


def _parquet_schemas(paths: list[str], settings: Settings, filesystem=None
                     ) -> tuple[pa.Schema, list[tuple[str, Any, pa.Schema]]]:
    """The files' unified schema and (path, filesystem, schema) of each, from their footers alone."""
    import pyarrow.parquet as pq
    opened = []
    for fs, f in parquet_files(paths, settings, filesystem):
        try:
            opened.append((f, fs, pq.read_schema(f, filesystem=fs)))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read parquet {f!r}: {exc}") from exc
    try:
        return pa.unify_schemas([s for _, _, s in opened]), opened
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DatasetError(f"parquet files {paths} have incompatible schemas: {exc}") from exc


def _parquet_batches(paths: list[str], settings: Settings, rows: int, filesystem=None) -> Iterator[pa.RecordBatch]:
    """Batches of ``rows`` rows (decoded that many at a time: the caller sizes them to a chunk, so a wide
    file never holds more than a chunk's bytes decoded)."""
    import pyarrow.parquet as pq
    schema, opened = _parquet_schemas(paths, settings, filesystem)
    for f, fs, file_schema in opened:
        try:
            with fs.open_input_file(f) as handle:
                # pre_buffer=False: read column chunks as decoded, not a whole row group's bytes up front;
                # a read buffer per column, so 64 KiB (1 MiB: 250 MiB for 250 columns)
                reader = pq.ParquetFile(handle, pre_buffer=False, buffer_size=64 << 10)
                for batch in reader.iter_batches(batch_size=rows, use_threads=True):
                    yield batch if file_schema.equals(schema) else _conform(batch, schema)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read parquet {f!r}: {exc}") from exc


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A file's batch in the unified schema (columns it lacks are null)."""
    cols = [batch.column(f.name).cast(f.type) if f.name in batch.schema.names else pa.nulls(batch.num_rows, f.type)
            for f in schema]
    return pa.RecordBatch.from_arrays(cols, schema=schema)
