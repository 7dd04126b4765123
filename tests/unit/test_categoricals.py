"""Categorical columns through the data plane: one mapping per dataset, the same codes everywhere."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from common.categories import CategoryEncoder, decode_table
from common.datasets import ChunkCache, DatasetReader
from common.errors import DatasetError, ValidationError
from common.ingest import write_batches
from common.manifest import Manifest
from common.store import MemoryStore
from producer.categoricals import (
    Declaration,
    categorical_columns,
    frame_matrix,
    lightgbm_names,
)
from producer.validation import check_types


def _frame(n: int = 1000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cities = np.array(["paris", "oslo", "rome", "lima", "kyiv"])
    return pd.DataFrame({
        "color": pd.Categorical(rng.choice(["red", "green", "blue"], n), categories=["blue", "green", "red", "gold"]),
        "city": rng.choice(cities, n).astype(object),
        "x": rng.normal(size=n),
        "y": rng.normal(size=n),
    })


def _write(table: pa.Table, store=None, chunk_rows=128, **kw):
    return write_batches(table.to_batches(max_chunksize=50), store or MemoryStore(), "bkt", chunk_rows=chunk_rows,
                         schema=table.schema, **kw)


def _read_shards(store, result, world, cache_dir):
    reader = DatasetReader(store, ChunkCache(cache_dir, 1 << 30))
    return [reader.read(result.uri, world_size=world, rank=r) for r in range(world)]


def test_every_chunk_and_every_shard_uses_the_one_mapping_in_the_manifest(tmp_path):
    df = _frame()
    store = MemoryStore()
    result = _write(pa.Table.from_pandas(df, preserve_index=False), store, categorical=["color", "city"])
    m = result.manifest
    assert len(m.chunks) > 3
    assert m.schema["color"] == "int32" and m.schema["city"] == "int32"
    assert m.categories["color"] == ["blue", "green", "red", "gold"]   # pandas' own category order
    assert m.categories["city"] == list(pd.unique(df["city"]))          # first-seen order
    shards = _read_shards(store, result, 3, tmp_path)
    codes = pa.concat_tables(shards)
    assert codes.column("color").to_pylist() == df["color"].cat.codes.tolist()
    assert codes.column("city").to_pylist() == pd.factorize(df["city"])[0].tolist()
    for shard in shards:   # each shard decodes to its own rows with the manifest alone
        back = decode_table(shard, m.categories).to_pandas()
        assert set(back["city"]) <= set(m.categories["city"])


def test_the_mapping_survives_the_manifest_round_trip():
    result = _write(pa.Table.from_pandas(_frame(300), preserve_index=False), categorical=["city"])
    again = Manifest.from_json(result.manifest.to_json())
    assert again == result.manifest and again.categories["city"]


def test_a_manifest_without_categoricals_reads_and_hashes_as_before():
    table = pa.table({"x": np.arange(300, dtype=np.float32), "y": np.ones(300)})
    result = _write(table)
    assert "categories" not in result.manifest.to_json()
    from common.manifest import dataset_hash
    assert result.manifest.dataset_hash == dataset_hash(result.manifest.schema,
                                                        [c.sha256 for c in result.manifest.chunks])


def test_the_content_hash_changes_when_only_the_mapping_changes():
    # The same codes (0, 1, 0, ...) under two mappings: identical chunks, different data.
    ab = pa.table({"c": pa.array(["a", "b"] * 100), "y": np.ones(200)})
    ba = pa.table({"c": pa.array(["b", "a"] * 100), "y": np.ones(200)})
    store = MemoryStore()
    first, second = _write(ab, store, categorical=["c"]), _write(ba, store, categorical=["c"])
    assert [c.sha256 for c in first.manifest.chunks] == [c.sha256 for c in second.manifest.chunks]
    assert first.manifest.categories != second.manifest.categories
    assert first.uri != second.uri


def test_nulls_stay_missing(tmp_path):
    t = pa.table({"c": pa.array(["a", None, "b", None]), "y": np.ones(4)})
    store = MemoryStore()
    result = _write(t, store, categorical=["c"])
    (table,) = _read_shards(store, result, 1, tmp_path)
    assert table.column("c").to_pylist() == [0, None, 1, None]
    assert result.manifest.categories == {"c": ["a", "b"]}


def test_a_frozen_mapping_makes_unseen_categories_missing_and_does_not_grow(tmp_path):
    train = pa.table({"c": pa.array(["a", "b"]), "y": [1.0, 2.0]})
    store = MemoryStore()
    mapping = _write(train, store, categorical=["c"]).manifest.categories
    evals = pa.table({"c": pa.array(["b", "zz", "a"]), "y": [1.0, 2.0, 3.0]})
    result = _write(evals, store, categorical=["c"], categories=mapping)
    assert result.manifest.categories == mapping
    (table,) = _read_shards(store, result, 1, tmp_path)
    assert table.column("c").to_pylist() == [1, None, 0]


def test_dictionaries_of_later_batches_are_remapped_to_the_first_codes():
    b1 = pa.record_batch({"c": pa.array(["x", "y"]).dictionary_encode(), "y": [1.0, 2.0]})
    b2 = pa.record_batch({"c": pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), pa.array(["z", "x"])),
                          "y": [3.0, 4.0]})
    enc = CategoryEncoder(b1.schema, ["c"])
    assert enc.encode(b1).column(0).to_pylist() == [0, 1]
    assert enc.encode(b2).column(0).to_pylist() == [2, 0]
    assert enc.mapping == {"c": ["x", "y", "z"]}


def test_a_float_category_column_is_refused_by_name():
    t = pa.table({"f": pa.array([1.5, 2.5]).dictionary_encode(), "y": [1.0, 2.0]})
    with pytest.raises(DatasetError, match="column 'f' of type dictionary<values=double"):
        CategoryEncoder(t.schema, ["f"])


def test_predict_frames_get_the_training_codes_and_unknown_categories_are_nan():
    mapping = {"city": ["paris", "oslo"], "color": ["blue", "green"]}
    frame = pd.DataFrame({"city": ["oslo", "lima", None], "color": pd.Categorical(["green", "blue", "green"]),
                          "x": [1.0, 2.0, 3.0]})
    X = frame_matrix(frame, ["x", "city", "color"], mapping)
    assert X.dtype == np.float32
    np.testing.assert_array_equal(X[:, 0], [1, 2, 3])
    np.testing.assert_array_equal(X[:, 1], [1, np.nan, np.nan])
    np.testing.assert_array_equal(X[:, 2], [1, 0, 1])


XGB = Declaration((), False, how="fit(..., categorical_cols=[...])",
                  how_dictionaries="params={'enable_categorical': True}")


def test_an_undeclared_string_column_is_named_with_how_to_declare_it():
    types = {"city": pa.large_string(), "x": pa.float64(), "y": pa.float64()}
    with pytest.raises(ValidationError, match=r"non-numeric columns in dataset 'train': \{'city': 'large_string'\} "
                                              r"\(declare string columns categorical with "
                                              r"fit\(\.\.\., categorical_cols=\['city'\]\)"):
        check_types("train", types, ["city", "x"], "y", None, categorical_columns("train", types, ["city", "x"], XGB),
                    XGB.how)


def test_a_category_column_needs_enable_categorical_for_xgboost():
    types = {"color": pa.dictionary(pa.int8(), pa.string()), "x": pa.float64()}
    with pytest.raises(ValidationError, match=r"columns \['color'\] in dataset 'train' are not declared: "
                                              r"declare them with params=\{'enable_categorical': True\}"):
        categorical_columns("train", types, ["color", "x"], XGB)
    on = Declaration((), True)
    assert categorical_columns("train", types, ["color", "x"], on) == ["color"]


def test_declared_names_and_lightgbm_indices_resolve_to_input_columns():
    types = {"a": pa.string(), "b": pa.int64(), "c": pa.float64()}
    assert categorical_columns("train", types, ["a", "b", "c"], Declaration(("a", 1))) == ["a", "b"]
    assert lightgbm_names("name:a,b") == ["a", "b"] and lightgbm_names("0,2") == [0, 2]
    with pytest.raises(ValidationError, match=r"categorical column 'zz' is not an input column"):
        categorical_columns("train", types, ["a", "b", "c"], Declaration(("zz",)))
    with pytest.raises(ValidationError, match=r"must be strings, pandas categories/Arrow dictionaries or integer "
                                              r"codes, got \{'c': 'double'\}"):
        categorical_columns("train", types, ["a", "b", "c"], Declaration(("c",)))
