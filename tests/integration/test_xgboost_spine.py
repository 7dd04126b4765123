"""A 2-worker XGBoost gang through real Redis, real S3 (weed mini) and real Celery worker processes."""
from __future__ import annotations

import json

import pytest
import xgboost as xgb

from common.models import JobState
from producer import DataConnector, TrainingJob
from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.integration.helpers import (
    FEATURES,
    all_workers_idle,
    regression_frame,
    rmse,
    wait_until,
)

pytestmark = pytest.mark.integration
PARAMS = {"objective": "reg:squarederror", "max_depth": 4, "learning_rate": 0.2}


@pytest.fixture(scope="module")
def trained(fleet):
    df = regression_frame(12000, seed=1)
    train, holdout = df.iloc[:10000], df.iloc[10000:]
    est = XGBEstimator(n_estimators=40, params=PARAMS, scaling_config=XGBScalingConfig(num_workers=2))
    booster = est.fit(dataset=DataConnector.from_dataframe(train), input_cols=FEATURES, label_col="risk",
                      eval_set=DataConnector.from_dataframe(holdout), verbose_eval=10, timeout=120)
    return est, booster, train, holdout


def test_two_worker_gang_rmse_is_within_5_percent_of_native_single_process_xgboost(trained):
    est, booster, train, holdout = trained
    assert isinstance(booster, xgb.Booster)
    native = xgb.train({**PARAMS, "nthread": 2}, xgb.QuantileDMatrix(train[FEATURES], train["risk"]), 40)
    ours = rmse(est.predict(holdout), holdout["risk"])
    theirs = rmse(native.predict(xgb.DMatrix(holdout[FEATURES])), holdout["risk"])
    assert abs(ours - theirs) / theirs <= 0.05, (ours, theirs)


def test_every_rank_of_the_gang_ends_with_the_same_booster(trained, state):
    est, *_ = trained
    ranks = state.ranks(est.last_job.job_id)
    assert sorted(ranks) == [0, 1]
    hashes = {r["summary"]["model_sha256"] for r in ranks.values()}
    assert len(hashes) == 1
    assert ranks[0]["worker"] != ranks[1]["worker"]
    assert all(r["summary"]["num_boosted_rounds"] == 40 for r in ranks.values())


def test_eval_results_have_train_and_eval_curves_of_every_round(trained):
    est, *_ = trained
    res = est.get_eval_results()
    assert set(res) == {"train", "eval"}
    assert len(res["eval"]["rmse"]) == 40
    assert res["eval"]["rmse"][-1] < res["eval"]["rmse"][0]


def test_artifacts_are_in_the_artifact_bucket_and_load(trained, fleet_settings):
    from common.store import S3Store
    est, booster, *_ = trained
    job_id = est.last_job.job_id
    store = S3Store(fleet_settings)
    keys = store.list(fleet_settings.artifact_bucket, f"model/{job_id}/")
    assert keys == [f"model/{job_id}/{n}" for n in ("eval_results.json", "metadata.json", "model.ubj")]
    loaded = xgb.Booster()
    loaded.load_model(bytearray(store.get(fleet_settings.artifact_bucket, f"model/{job_id}/model.ubj")))
    assert loaded.num_boosted_rounds() == 40
    meta = json.loads(store.get(fleet_settings.artifact_bucket, f"model/{job_id}/metadata.json"))
    assert meta["job_id"] == job_id and meta["spec"]["framework"] == "xgboost"
    assert "xgboost" in meta["versions"] and len(meta["gang"]["workers"]) == 2
    assert fleet_settings.s3_secret_key not in json.dumps(meta)


def test_verbose_eval_lines_of_rank_0_arrive_every_10_rounds(trained, capsys, state):
    est, *_ = trained
    lines = [ln for ln in state.log(est.last_job.job_id) if not ln.startswith("[rank ")]   # not the ranks' output
    assert [ln.split("\t")[0] for ln in lines] == ["[0]", "[10]", "[20]", "[30]", "[39]"]
    assert all("eval-rmse:" in ln for ln in lines)


def test_fit_prints_eval_lines_on_the_callers_console(fleet, capsys):
    df = regression_frame(3000, seed=2)
    est = XGBEstimator(n_estimators=12, params=PARAMS, scaling_config=XGBScalingConfig(num_workers=2))
    est.fit(df, FEATURES, "risk", eval_set=df.iloc[:500], verbose_eval=5, timeout=60)
    out = capsys.readouterr().out
    assert "[0]\ttrain-rmse:" in out and "[5]\t" in out and "[11]\t" in out


def test_second_fit_of_the_same_data_uploads_no_dataset_bytes(fleet, state):
    df = regression_frame(6000, seed=3)
    first = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
    first.fit(DataConnector.from_dataframe(df), FEATURES, "risk", timeout=60)
    second = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
    second.fit(DataConnector.from_dataframe(df.copy()), FEATURES, "risk", timeout=60)
    spec1 = json.loads(state.job(first.last_job.job_id)["spec"])
    spec2 = json.loads(state.job(second.last_job.job_id)["spec"])
    assert spec1["datasets"]["train"]["uploaded_bytes"] > 0
    assert spec2["datasets"]["train"]["uploaded_bytes"] == 0
    assert spec1["datasets"]["train"]["uri"] == spec2["datasets"]["train"]["uri"]


def test_from_uri_trains_on_a_dataset_already_in_the_store(fleet, state):
    df = regression_frame(4000, seed=4)
    conn = DataConnector.from_dataframe(df)
    est = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
    est.fit(conn, FEATURES, "risk", timeout=60)
    uri = json.loads(state.job(est.last_job.job_id)["spec"])["datasets"]["train"]["uri"]
    again = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
    again.fit(DataConnector.from_uri(uri), FEATURES, "risk", timeout=60)
    assert again.get_booster().num_boosted_rounds() == 3
    assert DataConnector.from_uri(uri).to_pandas(limit=5).shape == (5, 4)


def test_submit_returns_at_once_and_cancel_ends_the_job_and_frees_the_gang(fleet, state):
    df = regression_frame(40000, seed=5)
    est = XGBEstimator(n_estimators=100000, params={"max_depth": 8},
                       scaling_config=XGBScalingConfig(num_workers=2))
    job = est.submit(df, FEATURES, "risk")
    wait_until(lambda: job.status().state is JobState.RUNNING and
               any(r.get("iteration") for r in job.status().ranks.values()), 60, "training to start")
    st = job.cancel(wait=10)
    assert st.state is JobState.CANCELLED
    wait_until(lambda: all_workers_idle(state), 10, "the gang to be freed")
    with pytest.raises(Exception, match="cancelled"):
        job.wait(5)
    # The fleet takes new work right away.
    small = XGBEstimator(n_estimators=2, scaling_config=XGBScalingConfig(num_workers=2))
    assert small.fit(df.iloc[:2000], FEATURES, "risk", timeout=60).num_boosted_rounds() == 2


def test_a_job_can_be_reattached_by_id_from_another_handle(trained):
    est, *_ = trained
    again = TrainingJob(est.last_job.job_id)
    st = again.status()
    assert st.state is JobState.SUCCEEDED and st.attempt == 1 and set(st.ranks) == {0, 1}
    booster = again.result()   # what fit() returned, loaded from the artifacts
    assert booster.num_boosted_rounds() == est.get_booster().num_boosted_rounds()
    assert booster.save_raw("json") == est.get_booster().save_raw("json")
