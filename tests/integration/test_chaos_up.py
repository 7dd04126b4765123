"""Faults injected into the product itself: a real ``gangway up --workers 3`` subprocess, whose worker,
coordinator, Redis and S3 are killed with SIGKILL while jobs run. It restarts each; jobs finish."""
from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from common import keys
from common.models import JobState
from tests.conftest import private_fleet_settings
from tests.integration.helpers import (
    FEATURES,
    XGB_ARTIFACTS,
    assert_nothing_left,
    gangway,
    regression_frame,
    wait_until,
)
from tests.integration.up import UpFleet, gangway_up

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture(scope="module")
def up3(fleet):
    from common.state import State, connect
    settings = private_fleet_settings(drain_grace=3.0, lease_seconds=15.0)
    with gangway_up(settings, workers=3) as f:
        yield f, State(connect(settings)), settings


def _long_job(seed: int, rounds: int = 120):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    est = XGBEstimator(n_estimators=rounds, params={"max_depth": 6}, scaling_config=XGBScalingConfig(num_workers=2))
    return est.submit(regression_frame(20000, seed=seed), FEATURES, "risk", max_failures=2)


def _check_passes(settings) -> None:
    wait_until(lambda: gangway(settings, "check", ok=False).returncode == 0, 30, "`gangway check` to pass")


def test_a_worker_killed_with_its_whole_tree_is_restarted_and_the_job_finishes_on_retry(up3):
    fleet, state, settings = up3
    job = _long_job(seed=101)
    wait_until(lambda: (job.status().ranks.get(1, {}).get("iteration") or 0) >= 2, 90, "rank 1 to train")
    victim = job.status().ranks[1]["worker"]
    old_pid, child_pid = fleet.pid(f"worker-{victim}"), job.status().ranks[1]["pid"]
    killed_at = time.monotonic()
    os.killpg(old_pid, signal.SIGKILL)   # Celery parent, prefork child; the training child dies with them
    wait_until(lambda: any(w.alive and w.info.worker_id == victim and w.info.pid != old_pid
                           for w in state.workers()), 15, "the killed worker to register again")
    back_after = time.monotonic() - killed_at
    booster = job.wait(240)
    st = job.status()
    assert st.state is JobState.SUCCEEDED and st.attempt == 2 and booster.num_boosted_rounds() == 120
    assert "WorkerLostError" in job.record()["history"]
    _says(fleet, f"worker-{victim} (pid {old_pid}) killed by signal 9 (SIGKILL)", f"worker-{victim} is back")
    _check_passes(settings)
    assert_nothing_left(fleet, state, settings, job, artifacts=XGB_ARTIFACTS, pids=[child_pid])
    print(f"worker registered again {back_after:.1f} s after kill -9")


def test_a_killed_coordinator_is_restarted_and_the_running_job_still_succeeds(up3):
    fleet, state, settings = up3
    job = _long_job(seed=102)
    wait_until(lambda: (job.status().ranks.get(0, {}).get("iteration") or 0) >= 2, 90, "rank 0 to train")
    old_pid = fleet.pid("coordinator")
    killed_at = time.monotonic()
    os.killpg(old_pid, signal.SIGKILL)
    wait_until(lambda: state.coordinator_alive() and state.r.hget(keys.COORDINATOR_INFO, "pid") != str(old_pid),
               20, "a new coordinator to answer")
    back_after = time.monotonic() - killed_at
    assert job.wait(240).num_boosted_rounds() == 120 and job.status().state is JobState.SUCCEEDED
    _says(fleet, f"coordinator (pid {old_pid}) killed by signal 9", "coordinator is back")
    _check_passes(settings)
    assert_nothing_left(fleet, state, settings, job, artifacts=XGB_ARTIFACTS)
    print(f"coordinator answering again {back_after:.1f} s after kill -9")


def test_redis_killed_with_persistence_on_loses_neither_the_running_nor_the_pending_job(up3):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    fleet, state, settings = up3
    running = _long_job(seed=103, rounds=200)
    wait_until(lambda: (running.status().ranks.get(0, {}).get("iteration") or 0) >= 2, 90, "the first job to train")
    queued = XGBEstimator(n_estimators=10, scaling_config=XGBScalingConfig(num_workers=3)).submit(
        regression_frame(3000, seed=104), FEATURES, "risk", max_failures=2)
    wait_until(lambda: queued.status().state is JobState.PENDING, 20, "the second job to wait for its gang")
    time.sleep(1.5)   # appendfsync everysec: what was acknowledged a second ago is on disk
    killed_at = time.monotonic()
    os.kill(fleet.pid("redis"), signal.SIGKILL)
    wait_until(lambda: _redis_answers(state), 20, "Redis to be restarted")
    back_after = time.monotonic() - killed_at
    assert queued.wait(240).num_boosted_rounds() == 10
    assert running.wait(240).num_boosted_rounds() == 200
    assert running.status().state is JobState.SUCCEEDED and queued.status().state is JobState.SUCCEEDED
    _says(fleet, "redis is back")
    _check_passes(settings)
    for job in (running, queued):
        assert_nothing_left(fleet, state, settings, job, artifacts=XGB_ARTIFACTS)
    print(f"redis answering again {back_after:.1f} s after kill -9")


def test_s3_killed_is_restarted_on_its_data_folder_and_stored_data_is_not_uploaded_again(up3):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    fleet, state, settings = up3
    df = regression_frame(5000, seed=105)
    est = XGBEstimator(n_estimators=5, scaling_config=XGBScalingConfig(num_workers=2))
    est.fit(df, FEATURES, "risk", timeout=120)
    os.killpg(fleet.pid("s3"), signal.SIGKILL)
    _says(fleet, "s3 is back", timeout=60)
    again = XGBEstimator(n_estimators=5, scaling_config=XGBScalingConfig(num_workers=2))
    again.fit(df, FEATURES, "risk", timeout=120)
    assert json.loads(again.last_job.record()["spec"])["datasets"]["train"]["uploaded_bytes"] == 0
    _check_passes(settings)
    assert_nothing_left(fleet, state, settings, again.last_job, artifacts=XGB_ARTIFACTS)


def test_a_worker_that_keeps_dying_is_left_stopped_the_rest_keeps_serving_and_check_names_it(up3):
    fleet, state, settings = up3
    name = next(n for n in fleet.status() if n.startswith("worker-"))
    for _ in range(6):   # the sixth death within a minute is a crash loop (5 restarts allowed)
        pid = fleet.pid(name)
        os.killpg(pid, signal.SIGKILL)
        wait_until(lambda: fleet.status()[name]["pid"] != pid or fleet.status()[name]["state"] == "gave_up", 40,
                   f"{name} to be restarted or given up")
        if fleet.status()[name]["state"] == "gave_up":
            break
    assert fleet.status()[name]["state"] == "gave_up" and fleet.status()[name]["restarts"] == 5
    _says(fleet, f"{name} (pid {pid}) killed by signal 9 (SIGKILL); crash loop: 5 restarts within 60 s; not restarted")
    check = gangway(settings, "check", ok=False)
    assert check.returncode == 1 and f"FAIL supervisor: {name} killed by signal 9 (SIGKILL); crash loop" in check.stderr
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    est = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))   # the other two serve
    assert est.fit(regression_frame(2000, seed=106), FEATURES, "risk", timeout=120).num_boosted_rounds() == 3


def test_only_a_signal_stops_the_fleet_and_it_stops_everything_it_started(fleet):
    settings = private_fleet_settings()
    with gangway_up(settings, workers=1) as up:
        pids = [p.proc.pid for p in up.started]
        assert len(pids) == 4   # redis, s3, coordinator, one worker
        up.up.send_signal(signal.SIGTERM)
        up.up.wait(timeout=90)
        assert "gangway: stopped" in up.output()
        wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                   for p in pids), 20, "every process it started to be gone")


def _says(fleet: UpFleet, *lines: str, timeout: float = 15) -> None:
    """``gangway up`` is still running and has told the operator each of ``lines``."""
    wait_until(lambda: all(line in fleet.output() for line in lines), timeout, f"gangway up to say {lines}")
    assert fleet.up.poll() is None, fleet.output()


def _redis_answers(state) -> bool:
    try:
        return bool(state.r.ping())
    except Exception:
        return False
