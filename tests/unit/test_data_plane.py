import pyarrow as pa
import pytest

from common.datasets import ChunkCache, DatasetReader, write_dataset
from common.errors import DatasetError
from common.manifest import Manifest, assign_shard, shard_bounds
from common.store import MemoryStore


@pytest.mark.parametrize("rows,world", [(10, 3), (7, 7), (1000, 4), (5, 2)])
def test_shards_are_contiguous_row_balanced_and_cover_every_row(rows, world):
    bounds = [shard_bounds(rows, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_equal_shards_trim_the_remainder():
    assert [shard_bounds(10, 3, r, equal=True) for r in range(3)] == [(0, 3), (3, 6), (6, 9)]


def test_a_shard_is_a_run_of_chunk_slices():
    slices = assign_shard([4, 4, 4], 2, 1)
    assert [(s.chunk, s.offset, s.length) for s in slices] == [(1, 2, 2), (2, 0, 4)]


def test_rank_outside_the_world_is_an_error():
    with pytest.raises(ValueError, match="rank 3 is not in a world of size 2"):
        shard_bounds(10, 2, 3)


def _table(n=10):
    return pa.table({"x": pa.array(range(n), pa.float32()), "y": pa.array(range(n), pa.int64())})


def test_the_same_data_written_twice_uploads_nothing_the_second_time():
    store = MemoryStore()
    first = write_dataset(_table(), store, "bkt", chunk_rows=3)
    before = store.bytes_put
    second = write_dataset(_table(), store, "bkt", chunk_rows=3)
    assert first.uploaded_bytes > 0 and second.uploaded_bytes == 0 and store.bytes_put == before
    assert first.uri == second.uri


def test_different_data_gets_a_different_address():
    store = MemoryStore()
    assert write_dataset(_table(10), store, "bkt", chunk_rows=3).uri != \
        write_dataset(_table(11), store, "bkt", chunk_rows=3).uri


def test_manifest_round_trips_and_counts_rows():
    store = MemoryStore()
    res = write_dataset(_table(10), store, "bkt", chunk_rows=4)
    m = Manifest.from_json(res.manifest.to_json())
    assert m == res.manifest and m.num_rows == 10 and [c.rows for c in m.chunks] == [4, 4, 2]
    assert m.schema == {"x": "float", "y": "int64"}


def test_reader_returns_each_ranks_rows_and_a_retry_hits_the_cache(tmp_path):
    store = MemoryStore()
    uri = write_dataset(_table(10), store, "bkt", chunk_rows=3).uri
    reader = DatasetReader(store, ChunkCache(tmp_path, 10**9))
    parts = [reader.read(uri, world_size=3, rank=r).column("x").to_pylist() for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    fetched = reader.stats.bytes_fetched
    reader.read(uri, world_size=3, rank=0)
    assert reader.stats.bytes_fetched == fetched and reader.stats.bytes_cached > 0


def test_a_corrupt_chunk_is_detected_and_named(tmp_path):
    store = MemoryStore()
    res = write_dataset(_table(10), store, "bkt", chunk_rows=5)
    key = res.manifest.object_key("", res.manifest.chunks[1])
    store.put("bkt", key, b"not arrow")
    with pytest.raises(DatasetError, match=rf"chunk 1 \(s3://bkt/{key}\) of dataset {res.uri} is corrupt"):
        DatasetReader(store, ChunkCache(tmp_path, 10**9)).read(res.uri)


def test_the_cache_is_trimmed_to_its_size_bound_oldest_first(tmp_path):
    cache = ChunkCache(tmp_path, max_bytes=250)
    for i, name in enumerate("abc"):
        p = cache.path(name)
        p.write_bytes(b"x" * 100)
        import os
        os.utime(p, (i, i))
    cache.trim()
    assert sorted(p.stem for p in tmp_path.glob("*.arrow")) == ["b", "c"]


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(DatasetError, match="no gangway dataset at 's3://bkt/datasets/nope/'"):
        DatasetReader(MemoryStore(), ChunkCache(tmp_path, 1)).read("s3://bkt/datasets/nope/")


def test_a_content_addressed_manifest_is_read_from_the_store_once_a_host_and_any_other_every_time(tmp_path):
    from common.datasets import read_manifest_cached
    from common.manifest import MANIFEST_NAME
    store = MemoryStore()
    written = write_dataset(_table(), store, "bkt", chunk_rows=3)
    first = read_manifest_cached(store, written.uri, tmp_path)
    store.delete("bkt", f"datasets/{written.manifest.dataset_hash}/{MANIFEST_NAME}")
    assert read_manifest_cached(store, written.uri, tmp_path) == first == written.manifest   # kept on disk
    store.put("bkt", f"exports/latest/{MANIFEST_NAME}", written.manifest.to_json().encode())
    assert read_manifest_cached(store, "s3://bkt/exports/latest/", tmp_path) == written.manifest
    store.delete("bkt", f"exports/latest/{MANIFEST_NAME}")   # any other address may change: read every time
    with pytest.raises(DatasetError, match="no gangway dataset"):
        read_manifest_cached(store, "s3://bkt/exports/latest/", tmp_path)
    forged = "0" * 32   # a manifest not of the data its address names is not kept
    store.put("bkt", f"datasets/{forged}/{MANIFEST_NAME}", written.manifest.to_json().encode())
    read_manifest_cached(store, f"s3://bkt/datasets/{forged}/", tmp_path)
    store.delete("bkt", f"datasets/{forged}/{MANIFEST_NAME}")
    with pytest.raises(DatasetError, match="no gangway dataset"):
        read_manifest_cached(store, f"s3://bkt/datasets/{forged}/", tmp_path)
