"""The S3 server stopped under a running fleet: mid-fetch and restarted, or gone for good."""
from __future__ import annotations

import os
import signal
import time

import pytest

from common.errors import TrainingFailedError
from common.models import JobState, RankState
from tests.conftest import private_fleet_settings, running_fleet
from tests.integration.helpers import (
    FEATURES,
    XGB_ARTIFACTS,
    assert_nothing_left,
    regression_frame,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture(scope="module")
def store_fleet(fleet):
    from common.state import State, connect
    settings = private_fleet_settings(chunk_rows=2048)
    with running_fleet(settings, workers=2) as f:
        yield f, State(connect(settings)), settings


def _stop_s3(fleet) -> None:
    s3 = next(s for s in fleet.started if s.name == "s3")
    s3.proc.kill()
    s3.proc.wait(timeout=10)
    fleet.started.remove(s3)


def _when_a_rank_fetches(fleet, job) -> None:
    """Freeze the S3 server (SIGSTOP) as soon as the job is submitted, so a rank's fetch hangs in it, and wait
    for a rank to be fetching: a warm rank fetches a small shard in milliseconds, faster than a poll sees."""
    s3 = next(s for s in fleet.started if s.name == "s3")
    os.kill(s3.proc.pid, signal.SIGSTOP)
    wait_until(lambda: any(r.get("state") == RankState.FETCHING.value for r in job.status().ranks.values()),
               30, "a rank to start fetching")


def test_s3_stopped_mid_fetch_and_restarted_the_job_still_succeeds_exactly_once(store_fleet):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    fleet, state, settings = store_fleet
    est = XGBEstimator(n_estimators=20, scaling_config=XGBScalingConfig(num_workers=2))
    job = est.submit(regression_frame(120_000, seed=91), FEATURES, "risk", max_failures=2)   # fresh data: no cache
    _when_a_rank_fetches(fleet, job)
    _stop_s3(fleet)
    time.sleep(3)
    fleet._start_s3(time.monotonic() + 60)   # same data directory and port
    assert job.wait(180).num_boosted_rounds() == 20
    st = job.status()
    assert st.state is JobState.SUCCEEDED and st.attempt <= 2   # backoff rode it out, or one retry did
    if st.attempt == 2:   # the fetch gave up (StoreError); a fetching rank is never mistaken for a hung one
        assert '"StoreError"' in job.record()["history"] and "ProgressTimeoutError" not in job.record()["history"]
    assert_nothing_left(fleet, state, settings, job, artifacts=XGB_ARTIFACTS)


def test_s3_gone_for_good_fails_the_job_naming_the_bucket_and_key_and_frees_the_gang(store_fleet):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    fleet, state, settings = store_fleet
    est = XGBEstimator(n_estimators=20, scaling_config=XGBScalingConfig(num_workers=2))
    job = est.submit(regression_frame(120_000, seed=92), FEATURES, "risk", max_failures=0)
    _when_a_rank_fetches(fleet, job)
    _stop_s3(fleet)
    try:
        with pytest.raises(TrainingFailedError) as info:
            job.wait(120)
        errors = [e for e in info.value.rank_errors.values() if e["type"] == "StoreError"]
        assert errors, info.value.rank_errors
        assert f"s3://{settings.data_bucket}/datasets/" in errors[0]["message"]
        assert settings.s3_secret_key not in str(info.value)
        assert job.status().attempt == 1
    finally:
        fleet._start_s3(time.monotonic() + 60)
    assert_nothing_left(fleet, state, settings, job)
