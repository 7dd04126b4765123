"""Parquet referenced in place (manifest format 3), against the in-memory store."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.datasets import ChunkCache, DatasetReader
from common.errors import DatasetError, ObjectChangedError
from common.manifest import Manifest, assign_shard
from common.references import group_row_groups, reference_parquet
from common.store import MemoryStore


def _parquet(table: pa.Table, row_group_size: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore()
    for b in ("raw", "data"):
        s.ensure_bucket(b)
    return s


def _table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"x": rng.standard_normal(n), "y": rng.integers(0, 9, n), "s": [f"r{i}" for i in range(n)]})


def _put_files(store, tables, rg=1000, prefix="exports/"):
    for i, t in enumerate(tables):
        store.put("raw", f"{prefix}part-{i}.parquet", _parquet(t, rg))
    store.put("raw", f"{prefix}_SUCCESS", b"")


def test_row_groups_are_gathered_into_chunks_and_never_split():
    assert group_row_groups([1000] * 5, 8, 2500, None) == [(0, 3), (3, 5)]
    assert group_row_groups([10_000, 10, 10], 8, 2500, None) == [(0, 1), (1, 3)]
    assert group_row_groups([100] * 4, 1000, 10_000, 150_000) == [(0, 2), (2, 4)]


def test_a_referenced_prefix_uploads_only_its_manifest_and_reads_back_the_same_rows(store, tmp_path):
    tables = [_table(3500, 1), _table(2000, 2)]
    _put_files(store, tables)
    before = store.bytes_put
    written = reference_parquet(store, "data", ["s3://raw/exports/"], chunk_rows=2500)
    assert store.list("data", "") == [written.uri.split("data/", 1)[1] + "manifest.json"]
    assert store.bytes_put - before == written.uploaded_bytes < 10_000
    m = Manifest.from_json(store.get("data", written.uri.split("data/", 1)[1] + "manifest.json"))
    assert m.referenced and m.num_rows == 5500 and [c.rows for c in m.chunks] == [3000, 500, 2000]
    assert {c.source.key for c in m.chunks} == {"exports/part-0.parquet", "exports/part-1.parquet"}
    reader = DatasetReader(store, ChunkCache(tmp_path / "cache", 1 << 30))
    assert reader.read(written.uri).equals(pa.concat_tables(tables))
    halves = [reader.read(written.uri, world_size=2, rank=r) for r in (0, 1)]
    assert [h.num_rows for h in halves] == [2750, 2750]   # row-balanced: a range splits its boundary row group
    assert pa.concat_tables(halves).equals(pa.concat_tables(tables))
    pieces = reader.cache_shard(written.uri, world_size=2, rank=1, pin_dir=tmp_path / "pin")
    assert sum(p.length for p in pieces) == 2750
    again = reference_parquet(store, "data", ["s3://raw/exports/"], chunk_rows=2500)
    assert again.uri == written.uri and again.uploaded_bytes == 0


def test_files_with_different_columns_are_read_into_the_unified_schema(store, tmp_path):
    a, b = _table(100, 1), _table(50, 2).drop_columns(["s"])
    _put_files(store, [a, b])
    written = reference_parquet(store, "data", ["s3://raw/exports/"], chunk_rows=1000)
    got = DatasetReader(store, ChunkCache(tmp_path, 1 << 30)).read(written.uri)
    assert got.schema.names == ["x", "y", "s"] and got.num_rows == 150 and got.column("s").null_count == 50


def test_a_rewritten_source_is_another_dataset_and_fails_a_fetch_of_the_old_one(store, tmp_path):
    _put_files(store, [_table(3000, 1)])
    old = reference_parquet(store, "data", ["s3://raw/exports/"], chunk_rows=1000)
    store.put("raw", "exports/part-0.parquet", _parquet(_table(3000, 9), 1000))
    new = reference_parquet(store, "data", ["s3://raw/exports/"], chunk_rows=1000)
    assert new.uri != old.uri
    reader = DatasetReader(store, ChunkCache(tmp_path, 1 << 30))
    with pytest.raises(ObjectChangedError, match=r"source file s3://raw/exports/part-0.parquet of dataset .* "
                                                 r"changed after the dataset was made"):
        reader.read(old.uri)
    assert reader.read(new.uri).equals(_table(3000, 9))


def test_a_prefix_without_parquet_files_is_a_dataset_error(store):
    store.put("raw", "empty/_SUCCESS", b"")
    with pytest.raises(DatasetError, match="no parquet files under 's3://raw/empty/'"):
        reference_parquet(store, "data", ["s3://raw/empty/"], chunk_rows=10)


def test_shards_follow_rows_not_row_groups_when_row_groups_are_uneven(store, tmp_path):
    t = _table(10_000, 3)
    store.put("raw", "u/a.parquet", _parquet(t.slice(0, 9000), 9000))
    store.put("raw", "u/b.parquet", _parquet(t.slice(9000), 500))
    written = reference_parquet(store, "data", ["s3://raw/u/"], chunk_rows=1000)
    rows = [c.rows for c in written.manifest.chunks]
    assert rows == [9000, 1000]
    assert [sum(s.length for s in assign_shard(rows, 3, r)) for r in range(3)] == [3334, 3333, 3333]
    reader = DatasetReader(store, ChunkCache(tmp_path, 1 << 30))
    assert pa.concat_tables([reader.read(written.uri, world_size=3, rank=r) for r in range(3)]).equals(t)


def test_a_deleted_source_fails_a_fetch_naming_it(store, tmp_path):
    _put_files(store, [_table(3000, 1)])
    written = reference_parquet(store, "data", ["s3://raw/exports/"], chunk_rows=1000)
    del store._objects[("raw", "exports/part-0.parquet")]
    with pytest.raises(ObjectChangedError, match=r"s3://raw/exports/part-0.parquet is gone"):
        DatasetReader(store, ChunkCache(tmp_path, 1 << 30)).read(written.uri)


def test_parquet_in_the_store_is_referenced_unless_copied_local_files_never_are(tmp_path):
    from producer import DataConnector
    assert DataConnector.from_parquet("s3://raw/x/")._in_place
    assert not DataConnector.from_parquet("s3://raw/x/", copy=True)._in_place
    assert not DataConnector.from_parquet(["s3://raw/x/", str(tmp_path)])._in_place
    with pytest.raises(ValueError, match="are local files"):
        DataConnector.from_parquet(str(tmp_path), copy=False)
    from pyarrow import fs
    assert not DataConnector.from_parquet("s3://raw/x/", filesystem=fs.LocalFileSystem())._in_place
    with pytest.raises(ValueError, match="the fleet cannot read a filesystem"):
        DataConnector.from_parquet("s3://raw/x/", filesystem=fs.LocalFileSystem(), copy=False)


def test_a_filesystem_of_its_own_is_read_by_the_producer_and_uploaded(tmp_path):
    from pyarrow import fs

    from common.settings import Settings
    from producer import DataConnector
    t = _table(500, 4)
    pq.write_table(t, tmp_path / "a.parquet")
    store = MemoryStore()
    settings = Settings.from_env({}, home=str(tmp_path / "home"))
    written = DataConnector.from_parquet(str(tmp_path), filesystem=fs.LocalFileSystem()).materialise(store, settings)
    assert not written.manifest.referenced and written.manifest.num_rows == 500

