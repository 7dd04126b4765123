"""Categorical features trained natively on a 2-worker gang: a pandas ``category`` and a string column."""
from __future__ import annotations

import json

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from common.errors import ValidationError
from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.integration.helpers import COLORS, mixed_frame, rmse, training_codes
from tests.integration.helpers import MIXED_FEATURES as FEATURES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data():
    df = mixed_frame(8000, seed=31)
    return df.iloc[:6000], df.iloc[6000:]


def _same_model_on_every_rank(state, job_id: str) -> None:
    ranks = state.ranks(job_id)
    assert sorted(ranks) == [0, 1] and len({r["summary"]["model_sha256"] for r in ranks.values()}) == 1


def test_xgboost_trains_a_category_and_a_string_column_natively_on_two_workers(fleet, state, data):
    train, holdout = data
    params = {"max_depth": 4, "learning_rate": 0.3, "enable_categorical": True}
    est = XGBEstimator(n_estimators=30, params=params, scaling_config=XGBScalingConfig(num_workers=2))
    booster = est.fit(train, FEATURES, "y", eval_set=holdout, categorical_cols=["city"], timeout=120)
    assert booster.feature_types == ["c", "c", "q"]
    _same_model_on_every_rank(state, est.last_job.job_id)
    trees = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]
    assert any(t["categories_nodes"] for t in trees)   # categorical splits, not thresholds on codes

    without = XGBEstimator(n_estimators=30, params={"max_depth": 4, "learning_rate": 0.3},
                           scaling_config=XGBScalingConfig(num_workers=2))
    without.fit(train, ["x"], "y", timeout=120)
    ours, theirs = rmse(est.predict(holdout), holdout["y"]), rmse(without.predict(holdout), holdout["y"])
    assert ours < 0.5 * theirs, (ours, theirs)

    codes = xgb.DMatrix(training_codes(holdout, train), feature_names=FEATURES, feature_types=["c", "c", "q"],
                        enable_categorical=True)
    np.testing.assert_allclose(est.predict(holdout), booster.predict(codes), rtol=1e-6)


def test_the_manifest_carries_the_mapping_and_the_eval_set_shares_it(fleet, state, data):
    from common.datasets import read_manifest
    from common.settings import Settings
    from common.store import S3Store
    train, holdout = data
    est = XGBEstimator(n_estimators=2, params={"enable_categorical": True},
                       scaling_config=XGBScalingConfig(num_workers=2))
    est.fit(train, FEATURES, "y", eval_set=holdout, categorical_cols=["city"], timeout=120)
    spec = json.loads(state.job(est.last_job.job_id)["spec"])
    assert spec["train"]["categorical_cols"] == ["color", "city"]
    assert "enable_categorical" not in spec["params"]
    store = S3Store(Settings.from_env())
    m_train, m_eval = (read_manifest(store, spec["datasets"][n]["uri"]) for n in ("train", "eval"))
    assert m_train.categories == {"color": COLORS, "city": list(pd.unique(train["city"]))}
    assert m_eval.categories == m_train.categories


def test_lightgbm_trains_a_category_and_a_string_column_natively_on_two_workers(fleet, state, data):
    train, holdout = data
    params = {"objective": "regression", "num_leaves": 15, "learning_rate": 0.2, "min_data_per_group": 10,
              "cat_smooth": 1, "categorical_feature": ["city"]}
    est = LightGBMEstimator(n_estimators=40, params=params, scaling_config=LightGBMScalingConfig(num_workers=2))
    booster = est.fit(train, FEATURES, "y", eval_set=holdout, timeout=120)
    assert isinstance(booster, lgb.Booster) and booster.feature_name() == FEATURES
    _same_model_on_every_rank(state, est.last_job.job_id)
    splits = json.dumps(booster.dump_model()["tree_info"])
    assert '"decision_type": "=="' in splits   # categorical splits, not thresholds on codes

    without = LightGBMEstimator(n_estimators=40, params={"num_leaves": 15, "learning_rate": 0.2},
                                scaling_config=LightGBMScalingConfig(num_workers=2))
    without.fit(train, ["x"], "y", timeout=120)
    ours, theirs = rmse(est.predict(holdout), holdout["y"]), rmse(without.predict(holdout), holdout["y"])
    assert ours < 0.5 * theirs, (ours, theirs)
    np.testing.assert_allclose(est.predict(holdout), booster.predict(training_codes(holdout, train)), rtol=1e-6)


def test_an_unknown_category_at_predict_counts_as_missing(fleet, data):
    train, holdout = data
    est = LightGBMEstimator(n_estimators=5, params={"num_leaves": 7}, scaling_config=LightGBMScalingConfig(num_workers=2))
    booster = est.fit(train, FEATURES, "y", categorical_cols=["city"], timeout=120)
    row = holdout.iloc[:1].copy()
    row["city"] = "atlantis"
    missing = training_codes(holdout.iloc[:1], train)
    missing[0, 1] = np.nan
    np.testing.assert_allclose(est.predict(row), booster.predict(missing), rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: XGBEstimator(n_estimators=2, params={"enable_categorical": True},
                         scaling_config=XGBScalingConfig(num_workers=2)),
    lambda: LightGBMEstimator(n_estimators=2, scaling_config=LightGBMScalingConfig(num_workers=2)),
], ids=["xgboost", "lightgbm"])
def test_an_undeclared_string_column_fails_at_the_caller_naming_it(fleet, data, state, make):
    train, _ = data
    before = len(state.list_jobs(limit=1000))
    with pytest.raises(ValidationError, match=r"non-numeric columns in dataset 'train': \{'city': '(large_)?string'\} "
                                              r"\(declare string columns categorical with fit\(\.\.\., "
                                              r"categorical_cols=\['city'\]\)"):
        make().fit(train, FEATURES, "y")
    assert len(state.list_jobs(limit=1000)) == before   # nothing was queued


def test_a_category_column_without_enable_categorical_fails_at_the_caller_for_xgboost(fleet, data):
    train, _ = data
    est = XGBEstimator(n_estimators=2, scaling_config=XGBScalingConfig(num_workers=2))
    with pytest.raises(ValidationError, match=r"columns \['color'\] in dataset 'train' are not declared: declare "
                                              r"them with params=\{'enable_categorical': True\}"):
        est.fit(train, ["color", "x"], "y")


def test_a_stored_categorical_dataset_trains_again_from_its_uri_and_reads_back_as_categories(fleet, state, data):
    from producer import DataConnector
    train, _ = data
    first = XGBEstimator(n_estimators=3, params={"enable_categorical": True},
                         scaling_config=XGBScalingConfig(num_workers=2))
    first.fit(train, FEATURES, "y", categorical_cols=["city"], timeout=120)
    uri = json.loads(state.job(first.last_job.job_id)["spec"])["datasets"]["train"]["uri"]
    again = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
    booster = again.fit(DataConnector.from_uri(uri), FEATURES, "y", timeout=120)   # the manifest declares them
    assert booster.feature_types == ["c", "c", "q"]
    np.testing.assert_allclose(again.predict(train.iloc[:50]), first.predict(train.iloc[:50]), rtol=1e-6)
    back = DataConnector.from_uri(uri).to_pandas(limit=5)
    assert back["color"].tolist() == train["color"].iloc[:5].tolist()
    assert back["city"].tolist() == train["city"].iloc[:5].tolist()


def test_an_estimator_loading_a_finished_job_by_id_predicts_frames_with_its_codes(fleet, data):
    from producer import TrainingJob
    train, holdout = data
    est = LightGBMEstimator(n_estimators=5, params={"num_leaves": 7}, scaling_config=LightGBMScalingConfig(num_workers=2))
    est.fit(train, FEATURES, "y", categorical_cols=["city"], timeout=120)
    fresh = LightGBMEstimator()
    TrainingJob(est.last_job.job_id, loader=fresh._load).wait(60)   # as a reattaching process would
    np.testing.assert_allclose(fresh.predict(holdout), est.predict(holdout), rtol=1e-6)
