"""A 2-worker LightGBM gang through the real fleet."""
from __future__ import annotations

import lightgbm as lgb
import pytest

from common.errors import PlacementError, ValidationError
from producer import DataConnector
from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
from tests.integration.helpers import FEATURES, regression_frame, rmse

pytestmark = pytest.mark.integration
PARAMS = {"objective": "regression", "metric": "rmse", "num_leaves": 31, "learning_rate": 0.1,
          "feature_fraction": 0.9}


@pytest.fixture(scope="module")
def trained(fleet):
    df = regression_frame(12000, seed=21)
    train, holdout = df.iloc[:10000], df.iloc[10000:]
    est = LightGBMEstimator(n_estimators=40, params=PARAMS, scaling_config=LightGBMScalingConfig(num_workers=2))
    booster = est.fit(dataset=DataConnector.from_dataframe(train), input_cols=FEATURES, label_col="risk",
                      eval_set=DataConnector.from_dataframe(holdout), verbose_eval=10, timeout=120)
    return est, booster, train, holdout


def test_two_worker_lightgbm_rmse_is_within_5_percent_of_native_single_process(trained):
    est, booster, train, holdout = trained
    assert isinstance(booster, lgb.Booster)
    native = lgb.train({**PARAMS, "verbose": -1, "num_threads": 2},
                       lgb.Dataset(train[FEATURES], train["risk"]), num_boost_round=40)
    ours, theirs = rmse(est.predict(holdout), holdout["risk"]), rmse(native.predict(holdout[FEATURES]),
                                                                        holdout["risk"])
    assert abs(ours - theirs) / theirs <= 0.05, (ours, theirs)


def test_both_ranks_end_with_the_same_trees(trained, state):
    est, *_ = trained
    ranks = state.ranks(est.last_job.job_id)
    assert sorted(ranks) == [0, 1]
    assert len({r["summary"]["model_sha256"] for r in ranks.values()}) == 1
    assert all(r["summary"]["num_boosted_rounds"] == 40 for r in ranks.values())


def test_booster_and_eval_results_look_like_lightgbms_own(trained, state):
    est, booster, *_ = trained
    gain = est.get_booster().feature_importance(importance_type="gain")
    assert len(gain) == 3 and gain.sum() > 0 and booster.feature_name() == FEATURES
    res = est.get_eval_results()
    assert set(res) == {"train", "eval"} and len(res["eval"]["rmse"]) == 40
    lines = [ln for ln in state.log(est.last_job.job_id) if not ln.startswith("[rank ")]   # not the ranks' output
    assert [ln.split("\t")[0] for ln in lines] == ["[0]", "[10]", "[20]", "[30]", "[39]"]


def test_early_stopping_stops_every_rank_at_the_same_round(fleet, state):
    df = regression_frame(6000, seed=22)
    est = LightGBMEstimator(n_estimators=2000, params={**PARAMS, "learning_rate": 0.3},
                            scaling_config=LightGBMScalingConfig(num_workers=2))
    booster = est.fit(df.iloc[:5000], FEATURES, "risk", eval_set=df.iloc[5000:], early_stopping_rounds=5,
                      timeout=120)
    ranks = state.ranks(est.last_job.job_id)
    rounds = {r["summary"]["num_boosted_rounds"] for r in ranks.values()}
    best = {r["summary"]["best_iteration"] for r in ranks.values()}
    assert len(rounds) == 1 and len(best) == 1
    (best_iteration,) = best
    assert 0 < best_iteration <= rounds.pop() < 2000
    assert booster.current_iteration() == best_iteration   # the model is saved at its best round


def test_use_gpu_warns_that_lightgbm_trains_on_cpu(fleet):
    df = regression_frame(500, seed=23)
    est = LightGBMEstimator(n_estimators=2, scaling_config=LightGBMScalingConfig(num_workers=1, use_gpu=True))
    with pytest.warns(UserWarning, match="no distributed GPU learner"):
        with pytest.raises(PlacementError, match="use_gpu=True but the fleet has no GPU worker"):
            est.fit(df, FEATURES, "risk")


def test_device_gpu_in_params_trains_on_cpu_with_a_warning_and_a_log_line(fleet, state):
    df = regression_frame(2000, seed=24)
    est = LightGBMEstimator(n_estimators=3, params={"device_type": "gpu"},
                            scaling_config=LightGBMScalingConfig(num_workers=2))
    with pytest.warns(UserWarning, match="trains on the CPUs"):
        est.fit(df, FEATURES, "risk", timeout=60)
    assert any("training on the CPUs" in ln for ln in state.log(est.last_job.job_id))


def test_invalid_lightgbm_params_reach_the_caller_in_the_librarys_words(fleet):
    df = regression_frame(500, seed=25)
    with pytest.raises(ValidationError, match="Unknown objective type name: no_such"):
        LightGBMEstimator(n_estimators=2, objective="no_such",
                          scaling_config=LightGBMScalingConfig(num_workers=2)).fit(df, FEATURES, "risk")


def test_a_killed_lightgbm_rank_is_retried_from_the_latest_checkpoint(fleet, state):
    import os
    import signal

    from common.models import JobState
    from tests.integration.helpers import wait_until
    df = regression_frame(20000, seed=26)
    est = LightGBMEstimator(n_estimators=400, params=PARAMS, scaling_config=LightGBMScalingConfig(num_workers=2))
    job = est.submit(df, FEATURES, "risk", max_failures=1)

    def pid():
        st = job.status()
        r = st.ranks.get(1, {})
        return r.get("pid") if st.state is JobState.RUNNING and (r.get("iteration") or 0) >= 25 else None
    os.kill(wait_until(pid, 60, "rank 1 to pass round 25"), signal.SIGKILL)
    booster = job.wait(180)
    assert booster.current_iteration() == 400 and job.status().attempt == 2
    resumed = {r["summary"]["resumed_from_round"] for r in job.status().ranks.values()}
    assert len(resumed) == 1 and resumed.pop() >= 20
