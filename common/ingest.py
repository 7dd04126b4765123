"""Streaming ingest: record batches -> fixed-size chunks -> hashed -> uploaded as they come.

Memory is bounded by ``in_flight`` chunks (each serialised once) plus what the
source itself buffers: nothing ever holds the whole dataset. Chunks go to the
bucket's content-addressed pool (``chunks/<sha256>.arrow``) before the dataset's
hash is known; a chunk already there is not sent again. The manifest is written
last, so an upload that fails or is interrupted leaves no dataset behind (only
pooled chunks, which a later upload of the same data reuses).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from common.categories import CategoryEncoder, Mapping, check_mapping
from common.errors import DatasetError
from common.manifest import MANIFEST_NAME, ChunkInfo, Manifest, dataset_hash, pool_key
from common.store import ObjectStore

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]          # (rows, serialised bytes) of one finished chunk
Inspect = Callable[[pa.RecordBatch], None]      # sees every chunk before it is uploaded


@dataclass(frozen=True)
class WriteResult:
    uri: str
    manifest: Manifest
    uploaded_bytes: int
    seconds: float


def schema_dict(schema: pa.Schema) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


def _write_stream(sink, batch: pa.RecordBatch) -> None:
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)


def serialise(batch: pa.RecordBatch, reuse: bytearray | None = None) -> memoryview:
    """One chunk as an Arrow IPC stream (uncompressed, so readers can map it), written once, straight
    into the buffer that is uploaded: sized by a dry run, so no growing buffer and no second copy.
    ``reuse``: a buffer to write into when it is large enough (its first bytes are the result)."""
    size = pa.MockOutputStream()
    _write_stream(size, batch)
    n = size.size()
    out = reuse if reuse is not None and len(reuse) >= n else bytearray(n)
    view = memoryview(out)[:n]
    _write_stream(pa.FixedSizeBufferWriter(pa.py_buffer(view)), batch)
    return view


def peek_schema(batches: Iterable[pa.RecordBatch], schema: pa.Schema | None
                ) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The stream's schema (given, or the first batch's) and the same stream, first batch included."""
    it = iter(batches)
    if schema is not None:
        return schema, it
    try:
        first = next(it)
    except StopIteration:
        raise DatasetError("cannot write a dataset from no batches without a schema") from None
    return first.schema, itertools.chain([first], it)


def _combine(parts: list[pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatch:
    """One contiguous record batch (a chunk is one IPC batch: readers feed it whole to a framework)."""
    if len(parts) == 1:
        return parts[0]
    table = pa.Table.from_batches(parts, schema=schema).combine_chunks()
    return table.to_batches()[0]


VARIABLE_WIDTH_GUESS = 32   # bytes per value of a string/binary/nested column, for sizing chunks only


def row_bytes(schema: pa.Schema) -> int:
    """Estimated bytes of one row, from the schema alone (so the same data always cuts the same way)."""
    total = 0
    for f in schema:
        try:
            total += max(1, f.type.bit_width // 8)
        except ValueError:   # not fixed-width
            total += VARIABLE_WIDTH_GUESS
    return max(1, total)


def rows_per_chunk(schema: pa.Schema, chunk_rows: int, chunk_bytes: int | None) -> int:
    """``chunk_rows``, fewer for a wide table, so a chunk stays under ``chunk_bytes`` (memory per chunk
    in flight is a few times its size, whatever the width)."""
    if not chunk_bytes:
        return max(1, chunk_rows)
    return max(1, min(chunk_rows, chunk_bytes // row_bytes(schema)))


def rechunk(batches: Iterable[pa.RecordBatch], schema: pa.Schema, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """Cut a stream of batches of any sizes into batches of exactly ``chunk_rows`` (the last may be
    shorter), so the same rows give the same chunks however the source happened to batch them."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    pending: list[pa.RecordBatch] = []
    have = 0
    for i, batch in enumerate(batches):
        if not batch.schema.equals(schema, check_metadata=False):
            raise DatasetError(f"batch {i} has schema {schema_dict(batch.schema)}, but the dataset has "
                               f"{schema_dict(schema)}")
        batch = batch.replace_schema_metadata(schema.metadata)
        while batch.num_rows:
            take = min(chunk_rows - have, batch.num_rows)
            pending.append(batch.slice(0, take))
            have += take
            batch = batch.slice(take)
            if have == chunk_rows:
                yield _combine(pending, schema)
                pending, have = [], 0
    if pending:
        yield _combine(pending, schema)


def in_flight_for(memory: int | None, chunk_bytes: int, threads: int) -> int:
    """Chunks in flight within ``memory``: each holds its batch and its serialised copy (the thread's
    reused buffer), so ``memory // (2 x chunk)``, at least one, at most ``threads``."""
    if not memory:
        return max(1, threads)
    return max(1, min(threads, memory // max(1, 2 * chunk_bytes)))


class ChunkUploader:
    """Serialises, hashes and stores chunks on ``threads`` threads, at most ``in_flight`` at a time
    and, with ``memory``, at most that many bytes of chunks and their serialised copies (a chunk bigger
    than the bound still goes, alone)."""

    def __init__(self, store: ObjectStore, bucket: str, *, threads: int = 8, in_flight: int | None = None,
                 memory: int | None = None, progress: Progress | None = None) -> None:
        self.store, self.bucket = store, bucket
        self.threads = max(1, threads)
        self.in_flight = max(1, in_flight or self.threads)
        self.memory = memory
        self.progress = progress
        self.uploaded_bytes = 0
        self._lock = threading.Lock()
        self._buffers = threading.local()   # one serialising buffer per thread, reused chunk after chunk

    def _buffer(self, batch: pa.RecordBatch) -> memoryview:
        """``batch`` serialised into this thread's buffer: a fresh buffer per chunk would cost page faults
        and zeroing for every chunk (the same memory bound: one buffer per thread, ``threads`` in flight)."""
        view = serialise(batch, getattr(self._buffers, "out", None))
        self._buffers.out = view.obj
        return view

    def _store_chunk(self, batch: pa.RecordBatch) -> ChunkInfo:
        data = self._buffer(batch)
        sha = hashlib.sha256(data).hexdigest()
        key = pool_key(sha)
        if not self.store.exists(self.bucket, key):   # content-addressed: stored once, by anyone
            self.store.put(self.bucket, key, data, sha256=sha)   # the store signs with it: hashed once
            with self._lock:
                self.uploaded_bytes += len(data)
        if self.progress is not None:
            self.progress(batch.num_rows, len(data))
        rows, nbytes = batch.num_rows, len(data)
        del batch, data
        # Arrow's allocator keeps freed pages for reuse; hand them back so RSS follows what is in flight.
        pa.default_memory_pool().release_unused()
        return ChunkInfo(key=key, rows=rows, nbytes=nbytes, sha256=sha)

    def upload(self, chunks: Iterable[pa.RecordBatch], inspect: Inspect | None = None) -> list[ChunkInfo]:
        """Every chunk stored, in order; the first error (source or store) stops reading and is raised."""
        room = threading.Condition()
        held = {"chunks": 0, "bytes": 0}
        futures: list[Future] = []
        failed = threading.Event()

        def fits(cost: int) -> bool:
            if held["chunks"] >= self.in_flight:
                return False
            return not self.memory or held["chunks"] == 0 or held["bytes"] + cost <= self.memory

        def release(cost: int) -> None:
            with room:
                held["chunks"] -= 1
                held["bytes"] -= cost
                room.notify_all()

        def done(f: Future, cost: int) -> None:
            if f.cancelled() or f.exception() is not None:
                failed.set()
            release(cost)

        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="gangway-upload") as pool:
            try:
                for batch in chunks:
                    if inspect is not None:
                        inspect(batch)
                    cost = 2 * batch.nbytes   # the batch and its serialised copy
                    with room:
                        room.wait_for(lambda: fits(cost))
                        held["chunks"] += 1
                        held["bytes"] += cost
                    if failed.is_set():
                        release(cost)
                        break
                    f = pool.submit(self._store_chunk, batch)
                    f.add_done_callback(lambda f, cost=cost: done(f, cost))
                    futures.append(f)
                    del batch   # the pool holds the only reference: memory goes when the chunk is stored
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def write_batches(batches: Iterable[pa.RecordBatch], store: ObjectStore, bucket: str, *, chunk_rows: int,
                  chunk_bytes: int | None = None, schema: pa.Schema | None = None, threads: int = 8,
                  in_flight: int | None = None, memory: int | None = None,
                  meta: dict | None = None, progress: Progress | None = None,
                  inspect: Inspect | None = None, categorical: Sequence[str] = (),
                  categories: Mapping | None = None) -> WriteResult:
    """Stream ``batches`` into a content-addressed dataset; the manifest is written only once every
    chunk is stored, and not at all when the same data is already there.

    ``categorical`` columns (string or dictionary) are stored as int32 codes, their mapping in the
    manifest (``common.categories``); ``categories`` seeds and freezes that mapping (an eval set uses
    its training set's: a category the training set lacks becomes missing)."""
    t0 = time.perf_counter()
    schema, batches = peek_schema(batches, schema)
    encoder = CategoryEncoder(schema, categorical, known=categories, frozen=categories is not None)
    if encoder.columns:
        schema, batches = encoder.schema, encoder.encode_all(batches)
    store.ensure_bucket(bucket)
    rows = rows_per_chunk(schema, chunk_rows, chunk_bytes)
    # Threads beyond what the memory lets be in flight would only keep idle serialising buffers.
    threads = in_flight_for(memory, rows * row_bytes(schema), threads)
    uploader = ChunkUploader(store, bucket, threads=threads, in_flight=in_flight, memory=memory, progress=progress)
    chunks = uploader.upload(rechunk(batches, schema, rows), inspect)
    if not chunks:   # an empty dataset still has a schema: one empty chunk carries it
        chunks = uploader.upload([pa.RecordBatch.from_pylist([], schema=schema)])
    columns = schema_dict(schema)
    check_mapping(encoder.mapping)
    dhash = dataset_hash(columns, [c.sha256 for c in chunks], encoder.mapping)
    prefix = f"datasets/{dhash}/"
    manifest = Manifest(dataset_hash=dhash, schema=columns, chunks=tuple(chunks), meta=dict(meta or {}),
                        categories=encoder.mapping)
    uri = f"s3://{bucket}/{prefix}"
    uploaded = uploader.uploaded_bytes
    if not store.exists(bucket, prefix + MANIFEST_NAME):
        body = manifest.to_json().encode()
        store.put(bucket, prefix + MANIFEST_NAME, body)
        uploaded += len(body)
    seconds = time.perf_counter() - t0
    log.info("dataset %s: %d rows in %d chunks, %d bytes uploaded in %.1f s", uri, manifest.num_rows,
             len(chunks), uploaded, seconds)
    return WriteResult(uri, manifest, uploaded, seconds)
