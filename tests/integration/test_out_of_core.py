"""Out-of-core XGBoost in a real 2-worker gang: ranks stream cached chunks into ExtMemQuantileDMatrix and
reach in-core accuracy; a budget that cannot hold even that fails before training, with the numbers."""
from __future__ import annotations

import pytest
import xgboost as xgb

from common.errors import TrainingFailedError
from producer import DataConnector
from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.conftest import private_fleet_settings, running_fleet
from tests.integration.helpers import FEATURES, regression_frame, rmse

pytestmark = pytest.mark.integration
PARAMS = {"objective": "reg:squarederror", "max_depth": 4, "learning_rate": 0.2}

if not hasattr(xgb, "ExtMemQuantileDMatrix"):
    pytest.skip(f"xgboost {xgb.__version__} has no ExtMemQuantileDMatrix", allow_module_level=True)


def _est(rounds: int = 40) -> XGBEstimator:
    return XGBEstimator(n_estimators=rounds, params=PARAMS, scaling_config=XGBScalingConfig(num_workers=2))


def test_out_of_core_ranks_reach_the_rmse_of_in_core_xgboost():
    settings = private_fleet_settings(out_of_core="always", chunk_rows=2048)
    df = regression_frame(24000, seed=21)
    train, holdout = df.iloc[:20000], df.iloc[20000:]
    with running_fleet(settings, workers=2):
        est = _est()
        job = est.submit(DataConnector.from_dataframe(train), FEATURES, "risk",
                         eval_set=DataConnector.from_dataframe(holdout), timeout=120)
        job.wait(180)
        modes = {r: v.get("fetch", {}).get("memory", {}).get("mode") for r, v in job.status().ranks.items()}
        ours = rmse(est.predict(holdout), holdout["risk"])
    assert modes == {0: "external", 1: "external"}, job.status().ranks
    native = xgb.train({**PARAMS, "nthread": 2}, xgb.QuantileDMatrix(train[FEATURES], train["risk"]), 40)
    theirs = rmse(native.predict(xgb.DMatrix(holdout[FEATURES])), holdout["risk"])
    assert abs(ours - theirs) / theirs <= 0.05, (ours, theirs)


def test_a_budget_too_small_even_out_of_core_fails_before_training_with_the_numbers():
    settings = private_fleet_settings(worker_memory="64MiB")
    with running_fleet(settings, workers=2):
        with pytest.raises(TrainingFailedError) as info:
            _est(5).fit(regression_frame(4000, seed=22), FEATURES, "risk", timeout=60)
    err = next(iter(info.value.rank_errors.values()))
    assert err["type"] == "WorkerMemoryError", err
    assert "does not fit GANGWAY_WORKER_MEMORY=64 MiB even out of core" in err["message"]
    assert "raise GANGWAY_WORKER_MEMORY to at least" in err["message"]
