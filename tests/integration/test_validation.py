"""Bad input fails at the caller with the offending values, and the fleet stays healthy."""
from __future__ import annotations

import numpy as np
import pytest

from common.errors import PlacementError, TrainingFailedError, ValidationError
from producer import DataConnector
from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.integration.helpers import (
    FEATURES,
    all_workers_idle,
    regression_frame,
    wait_until,
)

pytestmark = pytest.mark.integration


def _est(**kw) -> XGBEstimator:
    return XGBEstimator(n_estimators=2, scaling_config=XGBScalingConfig(num_workers=kw.pop("n", 2)), **kw)


@pytest.fixture
def df():
    return regression_frame(500, seed=7)


def test_missing_input_columns_are_named_with_what_the_data_has(fleet, df):
    with pytest.raises(ValidationError, match=r"missing input columns \['height'\] in dataset 'train' "
                                              r"\(has: \['age', 'income', 'score', 'risk'\]\)"):
        _est().fit(df, ["age", "height"], "risk")


def test_missing_label_column_is_named(fleet, df):
    with pytest.raises(ValidationError, match=r"missing columns \['target'\]"):
        _est().fit(df, FEATURES, "target")


def test_non_numeric_feature_columns_are_named(fleet, df):
    df = df.assign(city=["paris"] * len(df))
    with pytest.raises(ValidationError, match=r"non-numeric columns in dataset 'train': \{'city': '(large_)?string'\}"):
        _est().fit(df, FEATURES + ["city"], "risk")


def test_empty_dataset_is_refused(fleet, df):
    with pytest.raises(ValidationError, match="dataset 'train' is empty"):
        _est().fit(df.iloc[:0], FEATURES, "risk")


def test_nan_and_inf_labels_are_counted(fleet, df):
    df = df.copy()
    df.loc[:2, "risk"] = np.nan
    df.loc[3, "risk"] = np.inf
    with pytest.raises(ValidationError, match="label column 'risk' of dataset 'train' has 4 missing, NaN or inf values"):
        _est().fit(df, FEATURES, "risk")


def test_a_gang_larger_than_the_fleet_fails_at_once_with_requested_and_available(fleet, df):
    with pytest.raises(PlacementError, match="num_workers=5 requested but the fleet has 2 eligible workers"):
        _est(n=5).fit(df, FEATURES, "risk")


def test_gpus_asked_of_a_cpu_fleet_fail_at_once(fleet, df):
    est = XGBEstimator(n_estimators=2, scaling_config=XGBScalingConfig(num_workers=1, use_gpu=True))
    with pytest.raises(PlacementError, match="use_gpu=True but the fleet has no GPU worker"):
        est.fit(df, FEATURES, "risk")


@pytest.mark.parametrize("n", [0, -2, 2.5, "2"])
def test_impossible_num_workers_is_refused_when_configured(n):
    with pytest.raises(ValidationError, match="num_workers must be -1"):
        XGBScalingConfig(num_workers=n)


def test_invalid_xgboost_params_reach_the_caller_in_the_librarys_words(fleet, df):
    with pytest.raises(ValidationError, match=r"invalid XGBoost params .*max_depth"):
        XGBEstimator(n_estimators=2, params={"max_depth": -3},
                     scaling_config=XGBScalingConfig(num_workers=2)).fit(df, FEATURES, "risk")
    with pytest.raises(ValidationError, match=r"Unknown objective function: `no:such`"):
        XGBEstimator(n_estimators=2, objective="no:such",
                     scaling_config=XGBScalingConfig(num_workers=2)).fit(df, FEATURES, "risk")


def test_wrong_argument_types_are_refused(fleet, df):
    with pytest.raises(ValidationError, match="input_cols must be a list"):
        _est().fit(df, "age", "risk")
    with pytest.raises(ValidationError, match="verbose_eval must be a bool or an integer"):
        _est().fit(df, FEATURES, "risk", verbose_eval="10")
    with pytest.raises(ValidationError, match="dataset: cannot make a DataConnector from builtins.list"):
        _est().fit([1, 2, 3], FEATURES, "risk")


def test_a_dataset_uri_that_does_not_exist_is_named(fleet, fleet_settings):
    uri = f"s3://{fleet_settings.data_bucket}/datasets/0000nope/"
    with pytest.raises(Exception, match="no gangway dataset at 's3://gangway-data/datasets/0000nope/'"):
        _est().fit(DataConnector.from_uri(uri), FEATURES, "risk")


def test_a_corrupt_chunk_fails_the_job_with_every_ranks_error_and_the_key_named(fleet, fleet_settings, state):
    from common.store import S3Store
    df = regression_frame(9000, seed=99)   # unique data: no cached chunks anywhere
    conn = DataConnector.from_dataframe(df)
    store = S3Store(fleet_settings)
    written = conn.materialise(store, fleet_settings)
    bucket, prefix = fleet_settings.data_bucket, written.uri.split(f"{fleet_settings.data_bucket}/", 1)[1]
    for chunk in written.manifest.chunks[1:]:   # the caller samples chunk 0; the ranks need the rest
        store.put(bucket, written.manifest.object_key(prefix, chunk), b"garbage")
    with pytest.raises(TrainingFailedError) as info:
        _est().fit(DataConnector.from_uri(written.uri), FEATURES, "risk", timeout=60)
    err = info.value
    assert err.rank_errors, str(err)
    first = next(iter(err.rank_errors.values()))
    assert first["type"] == "DatasetError" and "is corrupt" in first["message"] \
        and f"chunk 1 (s3://{bucket}/{written.manifest.chunks[1].key})" in first["message"]
    assert "Traceback" in first["traceback"]
    wait_until(lambda: all_workers_idle(state), 10, "the gang to be freed")


def test_the_fleet_is_healthy_after_every_bad_input(fleet, state, df):
    wait_until(lambda: all_workers_idle(state), 10, "idle workers")
    assert _est().fit(regression_frame(2000, seed=8), FEATURES, "risk", timeout=60).num_boosted_rounds() == 2


def test_wrong_s3_credentials_fail_at_the_caller_naming_endpoint_and_bucket_never_the_secret(fleet, fleet_settings,
                                                                                              monkeypatch, state):
    from common.errors import StoreError
    monkeypatch.setenv("GANGWAY_S3_SECRET_KEY", "not-the-secret-0123")
    with pytest.raises(StoreError) as info:
        _est().fit(regression_frame(300, seed=901), FEATURES, "risk")
    text = str(info.value)
    assert fleet_settings.s3_url in text and f"s3://{fleet_settings.data_bucket}/" in text, text
    assert "not-the-secret-0123" not in text and fleet_settings.s3_secret_key not in text
    assert "\n" not in text
    assert all_workers_idle(state)


def test_an_unreachable_s3_fails_at_the_caller_naming_the_endpoint(fleet, fleet_settings, monkeypatch, state):
    from common.errors import StoreError
    from workers.local.services import free_port
    endpoint = f"127.0.0.1:{free_port()}"   # MinIO's host:port form
    monkeypatch.setenv("GANGWAY_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("GANGWAY_STORE_OUTAGE_SECONDS", "1")
    with pytest.raises(StoreError, match=rf"at http://{endpoint} failed: cannot reach the store: NewConnectionError") as info:
        _est().fit(regression_frame(300, seed=902), FEATURES, "risk")
    assert f"s3://{fleet_settings.data_bucket}/" in str(info.value)
    assert all_workers_idle(state)
