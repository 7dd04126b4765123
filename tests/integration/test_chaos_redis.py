"""Redis restarted under a running fleet (no persistence): the fleet comes back and serves new jobs."""
from __future__ import annotations

import time

import pytest

from tests.conftest import private_fleet_settings, running_fleet
from tests.integration.helpers import (
    FEATURES,
    XGB_ARTIFACTS,
    assert_nothing_left,
    regression_frame,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_after_a_redis_restart_workers_re_register_and_new_jobs_run_within_30s(fleet):
    from common.state import State, connect
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    settings = private_fleet_settings()
    with running_fleet(settings, workers=2) as f:
        est = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
        est.fit(regression_frame(2000, seed=61), FEATURES, "risk", timeout=60)
        redis = next(s for s in f.started if s.name == "redis")
        redis.proc.kill()
        redis.proc.wait(timeout=10)
        f.started.remove(redis)
        restarted = time.time()
        f._start_redis(time.monotonic() + 30)          # an empty Redis on the same port
        state = State(connect(settings))
        wait_until(lambda: len([w for w in state.workers() if w.alive]) == 2 and state.coordinator_alive(), 30,
                   "workers and coordinator to come back")
        again = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
        assert again.fit(regression_frame(2000, seed=62), FEATURES, "risk", timeout=60).num_boosted_rounds() == 3
        assert float(again.last_job.record()["started_at"]) - restarted <= 30   # a gang reserved within 30 s
        assert_nothing_left(f, state, settings, again.last_job, artifacts=XGB_ARTIFACTS)
