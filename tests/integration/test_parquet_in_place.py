"""Parquet that already sits in the fleet's store is trained on in place: the producer writes only a
manifest of the files' row groups, the ranks read them straight from the objects, and a file rewritten
under a dataset fails the fetch naming it instead of feeding other rows."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import TrainingFailedError
from common.manifest import MANIFEST_NAME
from producer import DataConnector, ShardedDataConnector
from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.integration.helpers import FEATURES, regression_frame

pytestmark = pytest.mark.integration
RAW = "raw-parquet"


def _put_parquet(store, key: str, df, row_group_size: int = 3000) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, row_group_size=row_group_size)
    store.put(RAW, key, buf.getvalue())


@pytest.fixture(scope="module")
def store(fleet, fleet_settings):
    from common.store import S3Store
    s = S3Store(fleet_settings)
    s.ensure_bucket(RAW)
    return s


def _est(rounds: int = 10) -> XGBEstimator:
    return XGBEstimator(n_estimators=rounds, params={"max_depth": 4, "nthread": 1},
                        scaling_config=XGBScalingConfig(num_workers=2))


def test_an_s3_prefix_trains_in_place_adding_only_a_manifest_to_the_data_bucket(fleet, fleet_settings, store):
    df = regression_frame(20_000, seed=301)
    for i in range(3):   # 6,667 rows a file in row groups of 3,000: uneven groups, shards cut through them
        _put_parquet(store, f"exports/day=1/part-{i}.parquet", df.iloc[i * 6667:(i + 1) * 6667])
    store.put(RAW, "exports/day=1/_SUCCESS", b"")
    bucket = fleet_settings.data_bucket
    before = set(store.list(bucket, ""))
    in_place = _est()
    booster = in_place.fit(DataConnector.from_parquet(f"s3://{RAW}/exports/day=1/"), FEATURES, "risk", timeout=120)
    added = set(store.list(bucket, "")) - before
    assert len(added) == 1 and next(iter(added)).endswith(MANIFEST_NAME), added
    assert booster.num_boosted_rounds() == 10
    copied = _est().fit(DataConnector.from_parquet(f"s3://{RAW}/exports/day=1/", copy=True), FEATURES, "risk",
                        timeout=120)
    assert any(k.startswith("chunks/") for k in set(store.list(bucket, "")) - before)   # copy=True uploads chunks
    np.testing.assert_allclose(in_place.predict(df.iloc[:500]), _predict(copied, df.iloc[:500]), rtol=1e-6)


def _predict(booster, df):
    import xgboost as xgb
    return booster.predict(xgb.DMatrix(df[FEATURES]))


def test_a_rewritten_source_file_is_a_new_dataset(store, fleet_settings):
    _put_parquet(store, "changing/a.parquet", regression_frame(5000, seed=302))
    first = DataConnector.from_parquet(f"s3://{RAW}/changing/").materialise(store, fleet_settings)
    same = DataConnector.from_parquet(f"s3://{RAW}/changing/").materialise(store, fleet_settings)
    _put_parquet(store, "changing/a.parquet", regression_frame(5000, seed=303))
    second = DataConnector.from_parquet(f"s3://{RAW}/changing/").materialise(store, fleet_settings)
    assert same.uri == first.uri and same.uploaded_bytes == 0
    assert second.uri != first.uri
    etags = {c.source.etag for c in first.manifest.chunks} | {c.source.etag for c in second.manifest.chunks}
    assert len(etags) == 2


def test_a_source_file_rewritten_after_submit_fails_the_fetch_naming_the_file(fleet, store, fleet_settings):
    for name, seed in (("a", 304), ("b", 305)):
        _put_parquet(store, f"late/{name}.parquet", regression_frame(6000, seed=seed))
    written = DataConnector.from_parquet(f"s3://{RAW}/late/").materialise(store, fleet_settings)
    _put_parquet(store, "late/b.parquet", regression_frame(6000, seed=306))   # the caller samples a.parquet only
    with pytest.raises(TrainingFailedError) as info:
        _est(2).fit(DataConnector.from_uri(written.uri), FEATURES, "risk", timeout=60, max_failures=0)
    errors = list(info.value.rank_errors.values())
    assert errors and all(e["type"] == "ObjectChangedError" for e in errors), info.value.rank_errors
    message = errors[0]["message"]
    assert f"source file s3://{RAW}/late/b.parquet of dataset {written.uri}" in message, message
    assert "changed after the dataset was made" in message and "submit the job again" in message


def test_pytorch_ranks_read_their_shard_of_a_referenced_prefix(fleet, store):
    import pandas as pd

    from producer.pytorch import PyTorchDistributor, PyTorchScalingConfig
    from tests.integration import torch_jobs
    df = pd.DataFrame({"i": np.arange(1001), "x": np.arange(1001, dtype=np.float32)})
    _put_parquet(store, "torch/a.parquet", df.iloc[:700], row_group_size=300)
    _put_parquet(store, "torch/b.parquet", df.iloc[700:], row_group_size=300)
    dist = PyTorchDistributor(torch_jobs.context_probe, PyTorchScalingConfig(num_nodes=1, num_workers_per_node=2))
    dist.run(dataset_map={"full": DataConnector.from_parquet(f"s3://{RAW}/torch/"),
                          "part": ShardedDataConnector.from_parquet(f"s3://{RAW}/torch/", equal=True)}, timeout=120)
    ranks = dist.last_job.status().ranks
    infos = [ranks[r]["metrics"][f"rank{r}"] for r in (0, 1)]
    assert [(i["full_rows"], i["shard_rows"], i["shard_first"]) for i in infos] == [(1001, 500, 0), (1001, 500, 500)]


def test_parquet_with_categorical_columns_is_copied_so_ingest_can_encode_them(fleet, fleet_settings, store):
    from tests.integration.helpers import MIXED_FEATURES, mixed_frame
    df = mixed_frame(6000, seed=307)   # color and city are strings
    _put_parquet(store, "mixed/a.parquet", df)
    bucket = fleet_settings.data_bucket
    before = set(store.list(bucket, ""))
    est = _est(10)
    job = est.submit(DataConnector.from_parquet(f"s3://{RAW}/mixed/"), MIXED_FEATURES, "y",
                     categorical_cols=["color", "city"], timeout=120)
    job.wait(180)
    added = set(store.list(bucket, "")) - before
    assert any(k.startswith("chunks/") for k in added), added   # encoded codes were uploaded
    assert est.predict(df.iloc[:100]).shape == (100,)


def test_bad_labels_past_the_first_rows_are_found_from_row_group_statistics_naming_file_and_group(store):
    """Row group 2 of the second file has a null label, row group 1 of the third an inf: the submit-time
    sample (first 256 rows) sees neither; the footers' statistics do, and nothing is queued."""
    df = regression_frame(9000, seed=307)
    risk = df["risk"].astype("float64").to_numpy().copy()
    nulls = pa.array(risk, mask=np.arange(len(risk)) == 3000 + 2 * 1000 + 5)   # file 1, row group 2
    risk[6000 + 1000 + 7] = np.inf                                               # file 2, row group 1
    for i in range(3):
        part = df.iloc[i * 3000:(i + 1) * 3000].copy()
        table = pa.Table.from_pandas(part, preserve_index=False)
        label = nulls if i == 1 else pa.array(risk)
        table = table.set_column(table.schema.get_field_index("risk"), "risk", label.slice(i * 3000, 3000))
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=1000)
        store.put(RAW, f"badlabels/part-{i}.parquet", buf.getvalue())
    with pytest.raises(ValueError) as info:
        _est(2).fit(DataConnector.from_parquet(f"s3://{RAW}/badlabels/"), FEATURES, "risk", timeout=60)
    msg = str(info.value)
    assert "label column 'risk' of dataset 'train' has missing or inf values" in msg, msg
    assert f"1 nulls in row group 2 (1000 rows) of s3://{RAW}/badlabels/part-1.parquet" in msg, msg
    assert f"max inf in row group 1 (1000 rows) of s3://{RAW}/badlabels/part-2.parquet" in msg, msg


def test_a_nan_label_past_the_first_rows_fails_the_job_naming_the_label_and_the_fleet_trains_on(fleet, store):
    """NaN is not in parquet statistics, so parquet used in place can reach the ranks with a NaN label
    past the rows checked at submit; the job fails with a message naming it, and the next job trains."""
    df = regression_frame(6000, seed=309)
    risk = df["risk"].astype("float64").to_numpy().copy()
    risk[4321] = np.nan   # a float NaN, not a null (pandas would write a null, which statistics count)
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.set_column(table.schema.get_field_index("risk"), "risk", pa.array(risk, from_pandas=False))
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=3000)
    store.put(RAW, "nanlabels/part-0.parquet", buf.getvalue())
    df = df.drop(index=4321)
    with pytest.raises(TrainingFailedError) as info:
        _est(2).fit(DataConnector.from_parquet(f"s3://{RAW}/nanlabels/"), FEATURES, "risk", timeout=120)
    msg = str(info.value)
    # rows 3000-5999 are rank 1's shard: found before XGBoost saw it (rank 0 then fails in the collective)
    assert ("rank 1 failed: DatasetError: label column 'risk' of dataset 'train' has 1 NaN or inf value(s) in "
            "this rank's shard, the first at shard row 1,321 (value nan)") in msg, msg
    from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
    with pytest.raises(TrainingFailedError, match=r"label column 'risk' of dataset 'train' has 1 NaN"):
        LightGBMEstimator(n_estimators=2, params={"num_leaves": 7, "verbose": -1},
                          scaling_config=LightGBMScalingConfig(num_workers=2)).fit(
            DataConnector.from_parquet(f"s3://{RAW}/nanlabels/"), FEATURES, "risk", timeout=120)
    assert _est(2).fit(df, FEATURES, "risk", timeout=120).num_boosted_rounds() == 2


def test_delete_many_removes_every_listed_object_in_one_call_and_ignores_missing_ones(store):
    keys_ = [f"delete-many/{i}.bin" for i in range(5)]
    for k in keys_:
        store.put(RAW, k, b"x")
    store.delete_many(RAW, keys_[:3] + ["delete-many/never-there.bin"])
    assert store.list(RAW, "delete-many/") == keys_[3:]
    store.delete_many(RAW, [])
    store.delete_many(RAW, keys_[3:])
    assert store.list(RAW, "delete-many/") == []
