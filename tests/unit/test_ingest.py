"""Streaming ingest: chunking, content addressing and failure atomicity, against the in-memory store."""
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.datasets import ChunkCache, DatasetReader, write_dataset
from common.errors import DatasetError
from common.ingest import rechunk, write_batches
from common.manifest import MANIFEST_NAME, Manifest
from common.settings import Settings
from common.store import MemoryStore
from producer import DataConnector
from producer.progress import UploadProgress
from producer.validation import LabelCounter


def _table(n: int, start: int = 0) -> pa.Table:
    x = np.arange(start, start + n, dtype=np.float32)
    return pa.table({"x": x, "y": (x * 2).astype(np.float64)})


def _batches(table: pa.Table, sizes: list[int]):
    pos = 0
    for size in sizes:
        yield from table.slice(pos, size).to_batches()
        pos += size


def _manifests(store: MemoryStore, bucket: str = "bkt") -> list[str]:
    return [k for k in store.list(bucket, "datasets/") if k.endswith(MANIFEST_NAME)]


def test_rechunk_cuts_any_batching_into_chunks_of_exactly_chunk_rows():
    table = _table(23)
    chunks = list(rechunk(_batches(table, [1, 7, 2, 13]), table.schema, 5))
    assert [c.num_rows for c in chunks] == [5, 5, 5, 5, 3]
    assert pa.Table.from_batches(chunks).equals(table)


def test_the_same_rows_batched_differently_are_the_same_dataset():
    table = _table(1000)
    a = write_batches(_batches(table, [1000]), MemoryStore(), "bkt", chunk_rows=128)
    b = write_batches(_batches(table, [3, 500, 1, 496]), MemoryStore(), "bkt", chunk_rows=128)
    assert a.uri == b.uri and a.manifest == b.manifest


def test_a_second_upload_of_the_same_stream_sends_zero_bytes():
    store = MemoryStore()
    first = write_batches(_batches(_table(1000), [100] * 10), store, "bkt", chunk_rows=128)
    before = store.bytes_put
    second = write_batches(_batches(_table(1000), [100] * 10), store, "bkt", chunk_rows=128)
    assert first.uploaded_bytes > 0 and second.uploaded_bytes == 0 and store.bytes_put == before
    assert first.uri == second.uri


def test_chunks_another_dataset_stored_are_not_sent_again():
    store = MemoryStore()
    small = write_batches(_table(256).to_batches(), store, "bkt", chunk_rows=128)
    before = store.bytes_put
    big = write_batches(_table(384).to_batches(), store, "bkt", chunk_rows=128)   # its first 2 chunks = small's
    new_chunk = big.manifest.chunks[2].nbytes
    assert big.manifest.chunks[:2] == small.manifest.chunks
    assert store.bytes_put - before == big.uploaded_bytes == new_chunk + len(big.manifest.to_json().encode())


def test_an_interrupted_upload_leaves_no_manifest_and_a_retry_sends_only_what_is_missing():
    store = MemoryStore()
    table = _table(1000)

    def failing():
        yield from _batches(table, [500])
        raise OSError("source disk went away")

    with pytest.raises(OSError, match="source disk went away"):
        write_batches(failing(), store, "bkt", chunk_rows=100, threads=2)
    assert _manifests(store) == []
    stored_before = store.bytes_put
    assert stored_before > 0   # the chunks that made it are pooled ...
    done = write_batches(_batches(table, [1000]), store, "bkt", chunk_rows=100, threads=2)
    # ... and not sent again: over both attempts every chunk was sent exactly once
    manifest_bytes = len(done.manifest.to_json().encode())
    assert stored_before + done.uploaded_bytes == done.manifest.nbytes + manifest_bytes
    assert _manifests(store) == [done.uri.split("bkt/", 1)[1] + MANIFEST_NAME]


class FailingStore(MemoryStore):
    """Refuses puts of chunks after the first ``ok`` (a store outage midway)."""

    def __init__(self, ok: int) -> None:
        super().__init__()
        self.ok = ok

    def put(self, bucket, key, data, **kw):
        if key.startswith("chunks/"):
            if self.ok <= 0:
                from common.errors import StoreError
                raise StoreError(f"S3 put s3://{bucket}/{key} failed: connection reset")
            self.ok -= 1
        super().put(bucket, key, data, **kw)


def test_a_store_failure_midway_stops_reading_the_source_and_writes_no_manifest():
    store = FailingStore(ok=3)
    read = []

    def source():
        for i in range(1000):
            read.append(i)
            yield _table(10, start=i * 10).to_batches()[0]

    with pytest.raises(Exception, match="connection reset"):
        write_batches(source(), store, "bkt", chunk_rows=10, threads=2, in_flight=2)
    assert _manifests(store) == [] and len(read) < 50


class SlowStore(MemoryStore):
    """Puts take a while, so an unbounded writer would run far ahead of the store."""

    def put(self, bucket, key, data, **kw):
        time.sleep(0.01)
        super().put(bucket, key, data, **kw)


def test_at_most_in_flight_chunks_are_read_ahead_of_the_store():
    store = SlowStore()
    produced = [0]
    lock = threading.Lock()
    ahead = []

    def source():
        for i in range(60):
            with lock:
                ahead.append(produced[0] - len(store.list("bkt", "chunks/")))
            produced[0] += 1
            yield _table(10, start=i * 10).to_batches()[0]

    write_batches(source(), store, "bkt", chunk_rows=10, threads=2, in_flight=3)
    assert max(ahead) <= 3 + 1, ahead   # in flight, plus the chunk being cut


class HoldingStore(MemoryStore):
    """Records the bytes of chunks being stored at once (each put holds its chunk a while)."""

    def __init__(self):
        super().__init__()
        self.now, self.most, self.lock = 0, 0, threading.Lock()

    def put(self, bucket, key, data, **kw):
        with self.lock:
            self.now += len(data)
            self.most = max(self.most, self.now)
        time.sleep(0.01)
        super().put(bucket, key, data, **kw)
        with self.lock:
            self.now -= len(data)


def test_wide_chunks_in_flight_stay_within_the_upload_memory():
    wide = pa.table({f"c{i}": np.arange(i, i + 2000, dtype=np.float32) for i in range(64)})   # 256 B/row
    chunk = 2000 * 256   # one chunk of chunk_rows=2000: ~0.5 MB, ~1 MB with its serialised copy
    store = HoldingStore()
    write_batches(wide.to_batches(500), store, "bkt", chunk_rows=2000, threads=8, memory=3 * 2 * chunk)
    assert store.most <= 3 * chunk * 1.05, store.most   # 3 chunks fit the bound, not the 8 threads (+ IPC framing)
    store = HoldingStore()
    write_batches((wide.to_batches(500) * 8), store, "bkt", chunk_rows=2000, threads=8, memory=1)
    assert 0 < store.most <= chunk * 1.05   # a bound below one chunk still sends them, one at a time


def test_a_wide_parquet_source_is_decoded_in_batches_of_about_decode_bytes(tmp_path, settings, monkeypatch):
    import producer.connectors as connectors
    wide = pa.table({f"c{i}": np.arange(i, i + 30000, dtype=np.float32) for i in range(100)})   # 400 B/row
    pq.write_table(wide, tmp_path / "w.parquet", row_group_size=30000)
    monkeypatch.setattr(connectors, "DECODE_BYTES", 400 * 4000)
    settings = settings.replace(chunk_rows=10000)
    conn = DataConnector.from_parquet(str(tmp_path / "w.parquet"))
    sizes = [b.num_rows for b in conn._source.batches(settings, conn._batch_rows(settings))]
    assert max(sizes) == 4000 and sum(sizes) == 30000
    store = MemoryStore()
    w = conn.materialise(store, settings)
    assert [c.rows for c in w.manifest.chunks] == [10000, 10000, 10000]   # joined back into whole chunks
    assert conn.to_arrow(settings).equals(wide)


def test_an_empty_stream_with_a_schema_is_an_empty_dataset_and_without_one_an_error():
    schema = _table(1).schema
    res = write_batches(iter([]), MemoryStore(), "bkt", chunk_rows=10, schema=schema)
    assert res.manifest.num_rows == 0 and res.manifest.schema == {"x": "float", "y": "double"}
    with pytest.raises(DatasetError, match="no batches without a schema"):
        write_batches(iter([]), MemoryStore(), "bkt", chunk_rows=10)


def test_a_batch_with_another_schema_is_named():
    batches = [_table(3).to_batches()[0], pa.record_batch({"x": pa.array([1], pa.int64())})]
    with pytest.raises(DatasetError, match=r"batch 1 has schema \{'x': 'int64'\}, but the dataset has"):
        write_batches(batches, MemoryStore(), "bkt", chunk_rows=2)


def test_an_in_memory_table_written_streamed_reads_back_equal(tmp_path):
    store = MemoryStore()
    table = _table(1000)
    res = write_dataset(table, store, "bkt", chunk_rows=300)
    assert [c.rows for c in res.manifest.chunks] == [300, 300, 300, 100]
    assert all(c.key == f"chunks/{c.sha256}.arrow" for c in res.manifest.chunks)
    assert DatasetReader(store, ChunkCache(tmp_path, 10**9)).read(res.uri).equals(table)


def test_format_1_manifests_are_still_read(tmp_path):
    store = MemoryStore()
    store.ensure_bucket("bkt")
    res = write_dataset(_table(10), store, "bkt", chunk_rows=5)
    old = Manifest(res.manifest.dataset_hash, res.manifest.schema,
                   tuple(type(c)(f"chunk-{i:05d}.arrow", c.rows, c.nbytes, c.sha256)
                         for i, c in enumerate(res.manifest.chunks)), format_version=1)
    for i, c in enumerate(res.manifest.chunks):
        store.put("bkt", f"datasets/old/chunk-{i:05d}.arrow", store.get("bkt", c.key))
    store.put("bkt", "datasets/old/" + MANIFEST_NAME, old.to_json().encode())
    assert DatasetReader(store, ChunkCache(tmp_path, 10**9)).read("s3://bkt/datasets/old/").equals(_table(10))


# connectors over streamed sources ----------------------------------------------------------------

@pytest.fixture
def settings(tmp_path):
    return Settings.from_env({}, home=str(tmp_path), chunk_rows=100, fetch_threads=2)


def test_from_batches_uploads_a_generator_once_and_it_cannot_be_read_twice(settings):
    store = MemoryStore()
    conn = DataConnector.from_batches(_batches(_table(250), [50] * 5))
    res = conn.materialise(store, settings)
    assert [c.rows for c in res.manifest.chunks] == [100, 100, 50]
    assert res.uri == write_dataset(_table(250), MemoryStore(), "gangway-data", chunk_rows=100).uri
    again = DataConnector.from_batches(_batches(_table(250), [250]))
    assert again.materialise(store, settings).uploaded_bytes == 0
    spent = DataConnector.from_batches(iter(_table(5).to_batches()))
    spent.to_arrow(settings)
    assert spent.to_arrow(settings).num_rows == 5   # kept, not read again


def test_peeking_at_a_one_shot_stream_does_not_lose_its_first_rows(settings):
    conn = DataConnector.from_batches(_batches(_table(250), [10] * 25))
    assert conn.schema(settings).names == ["x", "y"]
    assert conn.to_arrow(settings, limit=15).num_rows == 15
    assert conn.materialise(MemoryStore(), settings).manifest.num_rows == 250


def test_parquet_sql_and_lazyframe_stream_the_same_rows(tmp_path, settings):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    table = _table(1000)
    cache, tmp_path = tmp_path / "cache", tmp_path / "data"
    tmp_path.mkdir()
    for i in range(4):
        pq.write_table(table.slice(i * 250, 250), tmp_path / f"part-{i}.parquet", row_group_size=60)
    sources = {
        "glob": DataConnector.from_parquet(str(tmp_path / "part-*.parquet")),
        "dir": DataConnector.from_parquet(str(tmp_path)),
        "list": DataConnector.from_parquet([str(tmp_path / f"part-{i}.parquet") for i in range(4)]),
        "sql": DataConnector.from_sql(f"select * from read_parquet('{tmp_path}/part-*.parquet') order by x",
                                      duckdb.connect()),
        "lazy": DataConnector.from_dataframe(pl.from_arrow(table).lazy()),
        "reader": DataConnector.from_dataframe(pa.RecordBatchReader.from_batches(table.schema, table.to_batches())),
    }
    for name, conn in sources.items():
        store = MemoryStore()
        res = conn.materialise(store, settings)
        assert [c.rows for c in res.manifest.chunks] == [100] * 10, name
        got = DatasetReader(store, ChunkCache(cache / name, 10**9)).read(res.uri)
        assert got.equals(table), name


def test_parquet_files_with_compatible_schemas_are_unified(tmp_path, settings):
    pq.write_table(pa.table({"a": pa.array([1, 2], pa.int64())}), tmp_path / "p0.parquet")
    pq.write_table(pa.table({"a": pa.array([3], pa.int64()), "b": [1.5]}), tmp_path / "p1.parquet")
    got = DataConnector.from_parquet(str(tmp_path / "*.parquet")).to_arrow(settings)
    assert got.column("a").to_pylist() == [1, 2, 3] and got.column("b").to_pylist() == [None, None, 1.5]


def test_labels_are_counted_chunk_by_chunk_on_the_way_up(settings):
    table = pa.table({"x": [1.0, 2.0, 3.0, 4.0], "y": [1.0, float("nan"), None, 2.0]})
    labels = LabelCounter("y")
    DataConnector.from_batches(table.to_batches(max_chunksize=1)).materialise(MemoryStore(), settings,
                                                                              inspect=labels)
    assert labels.bad == 2


def test_labels_of_parquet_in_place_are_checked_in_every_row_group_from_statistics_alone(tmp_path):
    y = [1.0] * 30
    y[14], y[25] = None, float("-inf")   # row groups 1 and 2 of 10 rows
    pq.write_table(pa.table({"x": list(range(30)), "y": y}), tmp_path / "a.parquet", row_group_size=10)
    pq.write_table(pa.table({"x": [1], "y": [2.0]}), tmp_path / "b.parquet", write_statistics=False)
    labels = LabelCounter("y")
    labels.footer("s3://raw/a.parquet", pq.read_metadata(tmp_path / "a.parquet"))
    labels.footer("s3://raw/b.parquet", pq.read_metadata(tmp_path / "b.parquet"))
    assert labels.bad_row_groups == ["1 nulls in row group 1 (10 rows) of s3://raw/a.parquet",
                                     "min -inf, max 1.0 in row group 2 (10 rows) of s3://raw/a.parquet"]
    assert labels.unchecked_row_groups == 1   # b.parquet was written without statistics


def test_upload_progress_counts_rows_and_bytes(settings):
    import io
    out = io.StringIO()
    with UploadProgress(250, "test", delay=0, file=out) as progress:
        write_batches(_table(250).to_batches(), MemoryStore(), "bkt", chunk_rows=100, progress=progress)
    assert progress.rows == 250 and progress.nbytes > 250 * 12
    assert "250/250" in out.getvalue() and "MB/s" in out.getvalue()


def test_a_missing_pooled_chunk_names_the_dataset_that_needed_it(tmp_path):
    from common.errors import StoreError
    store = MemoryStore()
    res = write_dataset(_table(10), store, "bkt", chunk_rows=5)
    del store._objects[("bkt", res.manifest.chunks[1].key)]
    with pytest.raises(StoreError, match=rf"no object s3://bkt/chunks/.* \(chunk 1 of dataset {res.uri}\)"):
        DatasetReader(store, ChunkCache(tmp_path, 10**9)).read(res.uri)
