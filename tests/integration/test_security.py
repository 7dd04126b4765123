"""GANGWAY_SECRET: signed jobs run; unsigned, mis-signed or tampered ones are refused and never executed."""
from __future__ import annotations

import os

import pytest

from common.errors import SecurityError, TrainingFailedError
from tests.conftest import private_fleet_settings, running_fleet
from tests.integration.helpers import FEATURES, assert_nothing_left, regression_frame

pytestmark = pytest.mark.integration
MARKER = "/tmp/gangway-test-tampered-function-ran"


def honest():
    return None


def evil():
    open(MARKER, "w").close()


@pytest.fixture(scope="module")
def signed_fleet(fleet):
    settings = private_fleet_settings(secret="fleet-secret")
    with running_fleet(settings, workers=2) as f:
        yield f, settings


def _as_producer(settings):
    """Point this process's producer at ``settings`` (the fixture restores env afterwards)."""
    os.environ.update(settings.as_env())


def test_a_signed_job_runs_and_secrets_stay_out_of_the_job_state(signed_fleet):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    _, settings = signed_fleet
    est = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
    est.fit(regression_frame(2000, seed=90), FEATURES, "risk", timeout=60)
    record = str(est.last_job.record())
    assert est.last_job.record()["state"] == "SUCCEEDED"
    for secret in (settings.secret, settings.s3_secret_key):
        assert secret not in record


def test_a_job_signed_with_another_secret_is_refused_before_it_runs(signed_fleet):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    _, settings = signed_fleet
    _as_producer(settings.replace(secret="not-the-fleet-secret"))
    try:
        est = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
        with pytest.raises(SecurityError, match="signature that does not match"):
            est.fit(regression_frame(2000, seed=91), FEATURES, "risk", timeout=60)
        assert est.last_job.status().attempt == 0   # never placed
    finally:
        _as_producer(settings)


@pytest.mark.chaos
def test_a_tampered_train_func_blob_is_refused_and_never_executed(signed_fleet):
    import cloudpickle

    from common.store import S3Store
    from producer.pytorch import (
        PyTorchDistributor,
        PyTorchScalingConfig,
        pickle_function,
    )
    _, settings = signed_fleet
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    dist = PyTorchDistributor(honest, PyTorchScalingConfig())
    dist.run(timeout=60)   # puts honest()'s blob in the store
    import hashlib
    key = f"functions/{hashlib.sha256(pickle_function(honest)).hexdigest()}.pkl"
    S3Store(settings).put(settings.data_bucket, key, cloudpickle.dumps(evil))   # swap the code in place
    tampered = PyTorchDistributor(honest, PyTorchScalingConfig())
    with pytest.raises(TrainingFailedError) as info:
        tampered.run(timeout=60)
    err = info.value.rank_errors[0]
    assert err["type"] == "SecurityError" and "tampered" in err["message"]
    assert not os.path.exists(MARKER)
    from common.state import State, connect
    assert_nothing_left(signed_fleet[0], State(connect(settings)), settings, tampered.last_job)
