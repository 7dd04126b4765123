import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from producer import DataConnector  # noqa: E402


def _table(n=100, chunk=16):
    t = pa.table({"x": np.arange(n, dtype=np.float32), "y": np.arange(n) % 3})
    return pa.Table.from_batches(t.to_batches(max_chunksize=chunk))


def _rows(ds):
    out = []
    for item in ds:
        x = item["x"]
        out.extend(x.reshape(-1).tolist())
    return out


def test_single_rows_without_a_batch_size_cover_every_row_once():
    ds = DataConnector.from_arrow(_table()).to_torch_dataset()
    items = list(ds)
    assert len(items) == 100 and items[0]["x"].shape == () and sorted(_rows(items)) == list(range(100))


def test_batches_have_the_asked_size_across_chunk_edges_and_the_last_partial_is_dropped():
    ds = DataConnector.from_arrow(_table()).to_torch_dataset(batch_size=30)
    batches = list(ds)
    assert [b["x"].shape[0] for b in batches] == [30, 30, 30]
    assert _rows(batches) == list(range(90))
    kept = list(DataConnector.from_arrow(_table()).to_torch_dataset(batch_size=30, drop_last_batch=False))
    assert [b["x"].shape[0] for b in kept] == [30, 30, 30, 10]


def test_shuffle_is_deterministic_per_epoch_and_differs_between_epochs():
    a = DataConnector.from_arrow(_table()).to_torch_dataset(batch_size=10, shuffle=True, seed=3)
    b = DataConnector.from_arrow(_table()).to_torch_dataset(batch_size=10, shuffle=True, seed=3)
    first_a, first_b = _rows(a), _rows(b)
    assert first_a == first_b and sorted(first_a) == list(range(100)) and first_a != list(range(100))
    assert _rows(a) != first_a   # epoch 2 has another order


def test_dataloader_workers_split_chunks_so_every_row_is_seen_once():
    ds = DataConnector.from_arrow(_table()).to_torch_dataset(batch_size=4, drop_last_batch=False)
    rows = [v for batch in DataLoader(ds, num_workers=2, batch_size=None) for v in batch["x"].tolist()]
    assert sorted(rows) == list(range(100))


def test_the_seed_idiom_of_a_default_dataloader_gives_n_by_1_columns():
    ds = DataConnector.from_arrow(_table()).to_torch_dataset(batch_size=8)
    batch = next(iter(DataLoader(ds)))
    features = torch.cat([batch[c].T for c in ["x", "y"]], dim=1)
    assert features.shape == (8, 2)


def test_from_sql_and_polars_sources():
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    con = duckdb.connect()
    conn = DataConnector.from_sql("select range::DOUBLE as x, range % 2 as y from range(10)", con)
    assert conn.to_pandas()["x"].tolist() == [float(i) for i in range(10)]
    pconn = DataConnector.from_dataframe(pl.DataFrame({"a": [1, 2, 3]}))
    assert pconn.to_pandas()["a"].tolist() == [1, 2, 3]
    with pytest.raises(Exception, match="query failed"):
        DataConnector.from_sql("select * from nowhere", con)


def test_get_shard_outside_a_training_function_is_a_clear_error():
    from producer import ShardedDataConnector
    with pytest.raises(RuntimeError, match="only available inside a train_func"):
        ShardedDataConnector.from_arrow(_table()).get_shard()


def test_every_row_is_seen_exactly_once_per_epoch_across_ranks_with_unequal_shards(tmp_path):
    from common.datasets import ChunkCache, DatasetReader, write_dataset
    from common.store import MemoryStore
    store = MemoryStore()
    uri = write_dataset(_table(n=103, chunk=103), store, "bkt", chunk_rows=10).uri
    reader = DatasetReader(store, ChunkCache(tmp_path, 10**9))
    seen = []
    for rank in range(3):
        shard = reader.read(uri, world_size=3, rank=rank)
        ds = DataConnector.from_arrow(shard).to_torch_dataset(batch_size=7, shuffle=True, drop_last_batch=False)
        seen += _rows(ds)
    assert sorted(seen) == list(range(103))


def test_parquet_globs_are_expanded_in_order(tmp_path):
    import pyarrow.parquet as pq
    for i in range(3):
        pq.write_table(pa.table({"a": [i]}), tmp_path / f"part-{i}.parquet")
    assert DataConnector.from_parquet(str(tmp_path / "part-*.parquet")).to_pandas()["a"].tolist() == [0, 1, 2]
    with pytest.raises(Exception, match="no parquet files match"):
        DataConnector.from_parquet(str(tmp_path / "none-*.parquet")).to_arrow()
