"""Materialise Arrow tables into the store (content-addressed) and read shards back.

Writers stream (``common.ingest``): each chunk is serialised once, hashed, and
stored only when the store lacks it. Readers fetch chunks in parallel into a
size-bounded local cache keyed by content hash and memory-map them, so plain
IPC chunks are read without copies and a retry does not fetch again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from common.errors import DatasetError, ObjectChangedError, StoreError
from common.ingest import WriteResult, schema_dict, write_batches  # noqa: F401  (re-exported)
from common.manifest import MANIFEST_NAME, Manifest, assign_shard
from common.references import decode_schema, read_reference
from common.store import ObjectStore, parse_s3_uri

log = logging.getLogger(__name__)


def write_dataset(table: pa.Table, store: ObjectStore, bucket: str, *, chunk_rows: int,
                  threads: int = 8, meta: dict | None = None, progress=None, inspect=None) -> WriteResult:
    """Upload an in-memory ``table`` as a content-addressed dataset (streamed: one chunk copy at a time)."""
    return write_batches(table.to_batches(), store, bucket, chunk_rows=chunk_rows, schema=table.schema,
                         threads=threads, meta=meta, progress=progress, inspect=inspect)


def read_manifest(store: ObjectStore, uri: str) -> Manifest:
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/"
    try:   # one GET, no HEAD first: only a missing manifest is a DatasetError, an outage stays a StoreError
        raw = store.get(bucket, prefix + MANIFEST_NAME)
    except StoreError as exc:
        if store.exists(bucket, prefix + MANIFEST_NAME):
            raise
        raise DatasetError(f"no gangway dataset at {uri!r} (missing {prefix + MANIFEST_NAME} "
                           f"in bucket {bucket!r})") from exc
    try:
        return Manifest.from_json(raw)
    except ValueError as exc:
        raise DatasetError(f"dataset manifest at {uri!r} is unreadable: {exc}") from exc


_CONTENT_ADDRESSED = re.compile(r"^s3://([^/]+)/datasets/([0-9a-f]{32})/?$")


def read_manifest_cached(store: ObjectStore, uri: str, folder: str | os.PathLike) -> Manifest:
    """``read_manifest``, kept in ``folder`` for a content-addressed dataset (``s3://<bucket>/datasets/<hash>/``,
    the hash that of its schema and chunks: the same URI always names the same data), so a host's ranks read
    a dataset's manifest once, not once a job; any other URI is read from the store every time."""
    m = _CONTENT_ADDRESSED.match(uri)
    if m is None:
        return read_manifest(store, uri)
    path = Path(folder) / f"{m.group(1)}-{m.group(2)}.json"
    try:
        return Manifest.from_json(path.read_bytes())
    except (OSError, ValueError):
        pass
    manifest = read_manifest(store, uri)
    if manifest.dataset_hash != m.group(2):   # not what its address promises: never kept
        return manifest
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(manifest.to_json())
        os.replace(tmp, path)   # whole or absent: a concurrent reader never sees half of it
    except OSError as exc:   # a read-only or full disk: the next job reads the store again
        log.debug("manifest of %s not kept in %s: %s", uri, folder, exc)
    return manifest


class ChunkCache:
    """A directory of chunk files named by content hash, trimmed to ``max_bytes`` (LRU)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def path(self, sha: str) -> Path:
        return self.root / f"{sha}.arrow"

    def get(self, sha: str) -> Path | None:
        p = self.path(sha)
        if p.exists():
            os.utime(p)   # mark as recently used
            return p
        return None

    def trim(self, keep: set[str] = frozenset()) -> None:
        files = sorted(self.root.glob("*.arrow"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.max_bytes:
                break
            if p.stem in keep:
                continue
            total -= p.stat().st_size
            p.unlink(missing_ok=True)


@dataclass
class FetchStats:
    bytes_fetched: int = 0
    bytes_cached: int = 0
    seconds: float = 0.0
    chunks: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


_writers: list[threading.Thread] = []


def join_cache_writers(timeout: float = 60.0) -> None:
    """Wait for write-behind cache files (call before a process exits)."""
    deadline = time.monotonic() + timeout
    for t in list(_writers):
        t.join(max(0.0, deadline - time.monotonic()))


class DatasetReader:
    """Reads datasets (whole or one rank's shard) through the local chunk cache.

    A missed chunk is fetched into memory, its SHA-256 checked, and read by Arrow
    straight from that buffer; the cache file is written behind (``write_behind``)
    so a first fetch does not wait for the disk. Cached chunks are memory-mapped.
    """

    def __init__(self, store: ObjectStore, cache: ChunkCache, threads: int = 8,
                 write_behind: bool = False) -> None:
        self.store = store
        self.cache = cache
        self.threads = threads
        self.write_behind = write_behind
        self.stats = FetchStats()
        self._to_cache: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def _get_chunk(self, bucket: str, prefix: str, key: str, index: int) -> bytes:
        try:
            return self.store.get(bucket, key)
        except StoreError as exc:   # pooled chunk keys do not say which dataset needed them: add it
            raise StoreError(f"{exc} (chunk {index} of dataset s3://{bucket}/{prefix})") from exc

    def _chunk_data(self, bucket: str, prefix: str, manifest: Manifest, index: int) -> tuple[bytes, int]:
        """A missed chunk's IPC bytes (checked against the manifest) and the bytes fetched for it: a
        stored chunk by its SHA-256, a referenced parquet range by its source's ETag."""
        chunk = manifest.chunks[index]
        if chunk.source is not None:
            try:
                return read_reference(self.store, manifest, chunk)
            except ObjectChangedError as exc:
                raise ObjectChangedError(
                    f"source file {chunk.source.uri} of dataset s3://{bucket}/{prefix} (chunk {index}) "
                    f"changed after the dataset was made ({exc}); submit the job again to train on the new "
                    "version") from exc
            except (StoreError, DatasetError) as exc:
                raise type(exc)(f"{exc} (chunk {index} of dataset s3://{bucket}/{prefix})") from exc
        key = manifest.object_key(prefix, chunk)
        data = self._get_chunk(bucket, prefix, key, index)
        digest = hashlib.sha256(data).hexdigest()
        if digest != chunk.sha256:
            raise DatasetError(f"chunk {index} (s3://{bucket}/{key}) of dataset s3://{bucket}/{prefix} is corrupt: "
                               f"sha256 {digest[:16]}… but the manifest says {chunk.sha256[:16]}…")
        return data, len(data)

    def _cached(self, chunk) -> Path | None:
        """The chunk's cache file when this host has it (counted as a hit), else None."""
        hit = self.cache.get(chunk.sha256)
        if hit is not None:
            with self._lock:
                self.stats.bytes_cached += chunk.nbytes
                self.stats.cache_hits += 1
        return hit

    def _fetch(self, bucket: str, prefix: str, manifest: Manifest, index: int) -> pa.Buffer:
        chunk = manifest.chunks[index]
        hit = self._cached(chunk)
        if hit is not None:
            return pa.memory_map(str(hit)).read_buffer()
        data, fetched = self._chunk_data(bucket, prefix, manifest, index)
        with self._lock:
            self.stats.bytes_fetched += fetched
            self.stats.cache_misses += 1
            self._to_cache.append((chunk.sha256, data))
        return pa.py_buffer(data)

    def _write_cache(self, keep: set[str]) -> None:
        with self._lock:
            items, self._to_cache = self._to_cache, []
        for sha, data in items:
            final = self.cache.path(sha)
            tmp = final.with_suffix(f".part{os.getpid()}.{threading.get_ident()}")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, final)
            except OSError:
                tmp.unlink(missing_ok=True)   # a full disk costs a refetch, never a failure
        self.cache.trim(keep=keep)

    def _finish(self, keep: set[str]) -> None:
        if not self.write_behind:
            self._write_cache(keep)
            return
        t = threading.Thread(target=self._write_cache, args=(keep,), name="gangway-cache-writer", daemon=True)
        _writers.append(t)
        t.start()

    def head(self, uri: str, rows: int, manifest: Manifest | None = None) -> pa.Table:
        """The first ``rows`` rows, fetching only the chunks that hold them."""
        manifest = manifest or read_manifest(self.store, uri)
        bucket, prefix = parse_s3_uri(uri)
        prefix = prefix.rstrip("/") + "/"
        tables, have, used = [], 0, set()
        for i, chunk in enumerate(manifest.chunks):
            if have >= rows:
                break
            tables.append(pa.ipc.open_stream(self._fetch(bucket, prefix, manifest, i)).read_all())
            used.add(chunk.sha256)
            have += chunk.rows
        self._finish(used)
        return pa.concat_tables(tables).slice(0, rows) if tables else empty_table(manifest)

    def _to_disk(self, bucket: str, prefix: str, manifest: Manifest, index: int) -> Path:
        """The chunk's cache file, fetched and written now if missing (never held beyond this call)."""
        chunk = manifest.chunks[index]
        hit = self._cached(chunk)
        if hit is not None:
            return hit
        data, fetched = self._chunk_data(bucket, prefix, manifest, index)
        final = self.cache.path(chunk.sha256)
        tmp = final.with_suffix(f".part{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DatasetError(f"cannot write chunk {index} of s3://{bucket}/{prefix} to the cache at "
                               f"{self.cache.root} ({len(data):,} bytes): {exc}") from exc
        with self._lock:
            self.stats.bytes_fetched += fetched
            self.stats.cache_misses += 1
        return final

    def _pin(self, bucket: str, prefix: str, manifest: Manifest, index: int, pin_dir: Path) -> Path:
        """The chunk as a file of the rank's own (a hard link to the cache's, a copy across devices): the
        host's cache is shared by its workers, and another rank's trim may remove the cache's name."""
        target = pin_dir / f"{manifest.chunks[index].sha256}.arrow"
        for _ in range(3):
            if target.exists():
                return target
            source = self._to_disk(bucket, prefix, manifest, index)
            try:
                os.link(source, target)
            except FileExistsError:
                pass
            except FileNotFoundError:
                continue   # trimmed between fetch and link: fetch again
            except OSError:
                shutil.copyfile(source, target)
        if not target.exists():
            raise DatasetError(f"chunk {index} of s3://{bucket}/{prefix} keeps disappearing from the cache at "
                               f"{self.cache.root} (GANGWAY_CACHE_BYTES={self.cache.max_bytes:,} is too small for the "
                               "shards of this host's ranks)")
        return target

    def cache_shard(self, uri: str, manifest: Manifest | None = None, *, world_size: int = 1, rank: int = 0,
                    equal: bool = False, pin_dir: str | os.PathLike | None = None) -> list[CachedSlice]:
        """``rank``'s shard as files on disk, for reading one chunk at a time (out of core). At most
        ``threads`` chunks are in memory while fetching. With ``pin_dir`` (the rank's folder) the files
        are the rank's own links, so no trim of the shared cache can take them while the rank trains."""
        t0 = time.perf_counter()
        manifest = manifest or read_manifest(self.store, uri)
        bucket, prefix = parse_s3_uri(uri)
        prefix = prefix.rstrip("/") + "/"
        slices = assign_shard([c.rows for c in manifest.chunks], world_size, rank, equal)
        if pin_dir is not None:
            os.makedirs(pin_dir, exist_ok=True)

        def get(s) -> Path:
            if pin_dir is None:
                return self._to_disk(bucket, prefix, manifest, s.chunk)
            return self._pin(bucket, prefix, manifest, s.chunk, Path(pin_dir))
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            paths = list(pool.map(get, slices))
        self.cache.trim(keep={manifest.chunks[s.chunk].sha256 for s in slices})
        self.stats.chunks += len(slices)
        self.stats.seconds += time.perf_counter() - t0
        return [CachedSlice(p, s.offset, s.length) for p, s in zip(paths, slices)]

    def read(self, uri: str, manifest: Manifest | None = None, *, world_size: int = 1,
             rank: int = 0, equal: bool = False) -> pa.Table:
        """The rows of ``rank``'s contiguous shard (the whole dataset for world_size=1)."""
        t0 = time.perf_counter()
        manifest = manifest or read_manifest(self.store, uri)
        bucket, prefix = parse_s3_uri(uri)
        prefix = prefix.rstrip("/") + "/"
        slices = assign_shard([c.rows for c in manifest.chunks], world_size, rank, equal)
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            buffers = list(pool.map(lambda s: self._fetch(bucket, prefix, manifest, s.chunk), slices))
        tables = [pa.ipc.open_stream(buf).read_all().slice(s.offset, s.length)   # zero-copy
                  for s, buf in zip(slices, buffers)]
        self._finish({manifest.chunks[s.chunk].sha256 for s in slices})
        self.stats.chunks += len(slices)
        self.stats.seconds += time.perf_counter() - t0
        if not tables:
            return empty_table(manifest)
        return pa.concat_tables(tables)


@dataclass(frozen=True)
class CachedSlice:
    """Rows [offset, offset+length) of the chunk file at ``path`` (in the on-disk cache)."""

    path: Path
    offset: int
    length: int


def read_cached(piece: CachedSlice) -> pa.Table:
    """One cached chunk's rows, memory-mapped: pages come from the file, not the heap."""
    with pa.memory_map(str(piece.path)) as source:
        return pa.ipc.open_stream(source).read_all().slice(piece.offset, piece.length)


def empty_table(manifest: Manifest) -> pa.Table:
    if manifest.arrow_schema:
        return decode_schema(manifest.arrow_schema).empty_table()
    return pa.table({name: pa.array([], type=_type_from_str(t)) for name, t in manifest.schema.items()})


def _type_from_str(text: str) -> pa.DataType:
    try:
        return pa.type_for_alias(text)
    except ValueError:
        return pa.null()
