"""Parquet that already sits in the store, used in place: manifests that reference row groups.

The producer reads only each file's footer (one ranged GET) and writes a manifest whose
chunks are ranges of consecutive row groups of one object, each pinned to the object's
size and ETag. A rank reads its chunks' byte spans with ranged GETs through the same store
client, decodes them into the dataset's schema and hands them on as one Arrow IPC chunk
(cached on disk like a copied chunk), so every reader downstream is the same. A source
object rewritten after the manifest was made answers with another ETag, and the fetch
fails with ``ObjectChangedError`` naming it, never with other rows.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import DatasetError, StoreError
from common.ingest import WriteResult, row_bytes, schema_dict, serialise
from common.manifest import (
    MANIFEST_NAME,
    REFERENCE_VERSION,
    ChunkInfo,
    Manifest,
    SourceRef,
    dataset_hash,
)
from common.store import ObjectInfo, ObjectStore, parse_s3_uri

log = logging.getLogger(__name__)

FOOTER_READ = 64 * 1024   # the producer reads this much of a file's end: most footers in one GET


class RangedFile(io.RawIOBase):
    """A read-only view of one version of an object: ``known`` byte ranges are served from memory,
    anything else is fetched with a ranged GET pinned to the ETag (so it is the same version)."""

    def __init__(self, store: ObjectStore, info: ObjectInfo, bucket: str,
                 known: dict[int, bytes] | None = None) -> None:
        self.store, self.info, self.bucket = store, info, bucket
        self.known = dict(known or {})
        self.fetched = sum(len(b) for b in self.known.values())
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.info.size}[whence] + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        stop = self.info.size if n is None or n < 0 else min(self.info.size, self.pos + n)
        start, self.pos = self.pos, max(self.pos, stop)
        if stop <= start:
            return b""
        for at, data in self.known.items():
            if at <= start and stop <= at + len(data):
                return data[start - at:stop - at]
        data = self.store.get_range(self.bucket, self.info.key, start, stop - start, etag=self.info.etag)
        self.fetched += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


# the producer: footers to a manifest ------------------------------------------------------------

def list_parquet(store: ObjectStore, uri: str) -> list[tuple[str, ObjectInfo]]:
    """(bucket, info) of every parquet object under ``uri`` (one key or a prefix), in key order;
    like pyarrow.dataset, ``_SUCCESS``, ``_metadata`` and hidden files are not data."""
    bucket, key = parse_s3_uri(uri)
    under = key.rstrip("/") + "/"
    found = [o for o in store.list_info(bucket, key) if not key or o.key == key or o.key.startswith(under)]
    files = [o for o in found if not os.path.basename(o.key).startswith(("_", "."))
             and not o.key.endswith("/")]
    if not files:
        raise DatasetError(f"no parquet files under {uri!r}")
    return [(bucket, o) for o in files]


def read_footer(store: ObjectStore, bucket: str, info: ObjectInfo) -> tuple[pq.FileMetaData, int]:
    """A parquet object's metadata, from one ranged GET of its end (two if the footer is larger)."""
    uri = f"s3://{bucket}/{info.key}"
    if info.size < 12:
        raise DatasetError(f"{uri} is not a parquet file ({info.size} bytes)")
    tail = min(info.size, FOOTER_READ)
    data = store.get_range(bucket, info.key, info.size - tail, tail, etag=info.etag)
    if data[-4:] != b"PAR1":
        raise DatasetError(f"{uri} is not a parquet file (no PAR1 magic at its end)")
    need = struct.unpack("<I", data[-8:-4])[0] + 8
    if need > info.size - 4:
        raise DatasetError(f"{uri} is not a parquet file (its footer claims {need} of its {info.size} bytes)")
    if need > tail:
        data = store.get_range(bucket, info.key, info.size - need, need, etag=info.etag)
    return parse_footer(uri, data[-need:]), need


def parse_footer(uri: str, footer: bytes) -> pq.FileMetaData:
    """A file's metadata from its footer alone (metadata, its length, ``PAR1``)."""
    try:   # the leading magic makes the buffer a file pyarrow accepts; nothing else of it is read
        return pq.read_metadata(pa.BufferReader(b"PAR1" + footer))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot read the parquet footer of {uri}: {exc}") from exc


def _span(meta: pq.FileMetaData, first: int, stop: int) -> tuple[int, int]:
    """Bytes [start, stop) of the column chunks of row groups [first, stop)."""
    lo, hi = None, 0
    for g in range(first, stop):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            start = col.data_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset:
                start = min(start, col.dictionary_page_offset)
            lo = start if lo is None else min(lo, start)
            hi = max(hi, start + col.total_compressed_size)
    return (lo or 0), hi


def group_row_groups(rows: list[int], row_size: int, chunk_rows: int, chunk_bytes: int | None
                     ) -> list[tuple[int, int]]:
    """Consecutive row groups gathered into chunks of about ``chunk_rows`` (and ``chunk_bytes``);
    a row group is never split, so one larger than that is a chunk of its own."""
    out, first, have = [], 0, 0
    for g, n in enumerate(rows):
        have += n
        if have >= chunk_rows or (chunk_bytes and have * row_size >= chunk_bytes):
            out.append((first, g + 1))
            first, have = g + 1, 0
    if first < len(rows):
        out.append((first, len(rows)))
    return out


def reference_chunks(bucket: str, info: ObjectInfo, meta: pq.FileMetaData, tail: int, schema: pa.Schema,
                     encoded_schema: str, chunk_rows: int, chunk_bytes: int | None) -> list[ChunkInfo]:
    rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    size = row_bytes(schema)
    chunks = []
    for first, stop in group_row_groups(rows, size, chunk_rows, chunk_bytes):
        n = sum(rows[first:stop])
        if not n:
            continue
        ref = SourceRef(bucket=bucket, key=info.key, size=info.size, etag=info.etag, row_groups=(first, stop),
                        span=_span(meta, first, stop), tail=tail)
        chunks.append(ChunkInfo(key=info.key, rows=n, nbytes=n * size, sha256=ref.identity(encoded_schema),
                                source=ref))
    return chunks


def encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def reference_parquet(store: ObjectStore, data_bucket: str, uris: list[str], *, chunk_rows: int,
                      chunk_bytes: int | None = None, threads: int = 8, meta: dict | None = None,
                      inspect_footer: Callable[[str, pq.FileMetaData], None] | None = None) -> WriteResult:
    """A dataset over the parquet objects under ``uris``, read in place: only the manifest is written
    (and not even that when the same objects, unchanged, were referenced before). ``inspect_footer``
    sees every file's metadata (s3 uri, footer) before the manifest is written, e.g. to check a
    column's row-group statistics."""
    t0 = time.perf_counter()
    files = [f for uri in uris for f in list_parquet(store, uri)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        footers = list(pool.map(lambda f: read_footer(store, *f), files))
    if inspect_footer is not None:
        for (bucket, info), (m, _) in zip(files, footers):
            inspect_footer(f"s3://{bucket}/{info.key}", m)
    try:
        schema = pa.unify_schemas([m.schema.to_arrow_schema() for m, _ in footers])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DatasetError(f"parquet files {uris} have incompatible schemas: {exc}") from exc
    schema = schema.remove_metadata()
    encoded = encode_schema(schema)
    chunks = [c for (bucket, info), (m, tail) in zip(files, footers)
              for c in reference_chunks(bucket, info, m, tail, schema, encoded, chunk_rows, chunk_bytes)]
    columns = schema_dict(schema)
    dhash = dataset_hash(columns, [c.sha256 for c in chunks])
    manifest = Manifest(dataset_hash=dhash, schema=columns, chunks=tuple(chunks), format_version=REFERENCE_VERSION,
                        meta=dict(meta or {}), arrow_schema=encoded)
    prefix = f"datasets/{dhash}/"
    store.ensure_bucket(data_bucket)
    uploaded = 0
    if not store.exists(data_bucket, prefix + MANIFEST_NAME):
        body = manifest.to_json().encode()
        store.put(data_bucket, prefix + MANIFEST_NAME, body)
        uploaded = len(body)
    uri = f"s3://{data_bucket}/{prefix}"
    seconds = time.perf_counter() - t0
    log.info("dataset %s: %d rows in %d row-group ranges of %d parquet files, referenced in place (%.1f s)",
             uri, manifest.num_rows, len(chunks), len(files), seconds)
    return WriteResult(uri, manifest, uploaded, seconds)


# the rank: row groups to an Arrow chunk ---------------------------------------------------------

def _fetch_ranges(store: ObjectStore, src: SourceRef) -> tuple[bytes, bytes]:
    """(footer, row groups' span): one ranged GET when they are adjacent (a file's last range), else two;
    every GET pinned to the ETag the manifest names."""
    footer_at = src.size - src.tail
    if src.span[1] == footer_at:
        both = store.get_range(src.bucket, src.key, src.span[0], src.size - src.span[0], etag=src.etag)
        cut = footer_at - src.span[0]
        return both[cut:], both[:cut]
    footer = store.get_range(src.bucket, src.key, footer_at, src.tail, etag=src.etag)
    return footer, store.get_range(src.bucket, src.key, src.span[0], src.span[1] - src.span[0], etag=src.etag)


def read_reference(store: ObjectStore, manifest: Manifest, chunk: ChunkInfo) -> tuple[bytearray, int]:
    """The chunk's rows as one Arrow IPC chunk in the dataset's schema, and the bytes fetched for it."""
    src = chunk.source
    footer, body = _fetch_ranges(store, src)
    meta = parse_footer(src.uri, footer)
    f = RangedFile(store, ObjectInfo(src.key, src.size, src.etag), src.bucket, {src.span[0]: body})
    f.fetched += len(footer)
    try:
        pf = pq.ParquetFile(f, metadata=meta, pre_buffer=False)
        table = pf.read_row_groups(list(range(*src.row_groups)), use_threads=True)
    except (StoreError, DatasetError):
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot read row groups {src.row_groups[0]}..{src.row_groups[1] - 1} of {src.uri}: "
                           f"{exc}") from exc
    del body, footer
    if table.num_rows != chunk.rows:
        raise DatasetError(f"row groups {src.row_groups[0]}..{src.row_groups[1] - 1} of {src.uri} hold "
                           f"{table.num_rows} rows, but the manifest says {chunk.rows}")
    schema = decode_schema(manifest.arrow_schema)
    batch = conform(table, schema).combine_chunks().to_batches(max_chunksize=max(1, table.num_rows))[0]
    del table
    data = serialise(batch).obj   # a fresh buffer: exactly the chunk
    return data, f.fetched


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A file's rows in the dataset's unified schema (columns it lacks are null)."""
    table = table.replace_schema_metadata(None)
    if table.schema.equals(schema):
        return table
    cols = [table.column(f.name).cast(f.type) if f.name in table.schema.names
            else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)
