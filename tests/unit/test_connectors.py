import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.settings import Settings
from common.store import MemoryStore
from producer import DataConnector, ShardedDataConnector


@pytest.fixture
def settings(tmp_path):
    return Settings.from_env({}, home=str(tmp_path), chunk_rows=2)


def test_every_constructor_yields_the_same_table():
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "y": [0, 1, 0]})
    table = pa.Table.from_pandas(df, preserve_index=False)
    for conn in (DataConnector.from_pandas(df), DataConnector.from_dataframe(df), DataConnector.from_arrow(table),
                 DataConnector.from_dataframe(table), DataConnector.from_arrow(table.to_batches()[0])):
        assert conn.to_arrow().equals(table)


def test_parquet_files_are_read_and_concatenated(tmp_path):
    for i in range(2):
        pq.write_table(pa.table({"a": [i, i]}), tmp_path / f"p{i}.parquet")
    conn = DataConnector.from_parquet([str(tmp_path / "p0.parquet"), str(tmp_path / "p1.parquet")])
    assert conn.to_pandas()["a"].tolist() == [0, 0, 1, 1]
    assert conn.to_pandas(limit=3).shape == (3, 1)


def test_a_missing_parquet_file_is_named(tmp_path):
    with pytest.raises(Exception, match="cannot read parquet .*nope.parquet"):
        DataConnector.from_parquet(str(tmp_path / "nope.parquet")).to_arrow()


def test_unsupported_objects_are_refused_with_their_type():
    with pytest.raises(TypeError, match="cannot make a DataConnector from builtins.dict"):
        DataConnector.from_dataframe({"a": [1]})
    with pytest.raises(TypeError, match="from_pandas expects a pandas.DataFrame, got list"):
        DataConnector.from_pandas([1])
    with pytest.raises(ValueError, match="not an s3:// URI"):
        DataConnector.from_uri("/data/x")


def test_a_connector_materialises_once_per_store(settings):
    store = MemoryStore()
    conn = DataConnector.from_pandas(pd.DataFrame({"a": range(5)}))
    first = conn.materialise(store, settings)
    second = conn.materialise(store, settings)
    assert first.uploaded_bytes > 0 and second.uploaded_bytes == 0 and first.uri == second.uri
    assert [c.rows for c in first.manifest.chunks] == [2, 2, 1]


def test_sharded_connectors_carry_equal():
    conn = ShardedDataConnector.from_pandas(pd.DataFrame({"a": [1]}), equal=True)
    assert conn.sharded and conn.equal and not DataConnector.sharded
