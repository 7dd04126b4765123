"""A whole trainer worker killed mid-job (Celery parent and children, kill -9), on a fleet of its own."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from common.models import JobState
from tests.conftest import private_fleet_settings, running_fleet
from tests.integration.helpers import (
    FEATURES,
    XGB_ARTIFACTS,
    assert_nothing_left,
    regression_frame,
    training_processes,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture(scope="module")
def three_workers(fleet):
    """A second, private fleet of 3 workers; the producer is pointed at it for this module only."""
    from common.state import State, connect
    settings = private_fleet_settings(drain_grace=3.0)
    with running_fleet(settings, workers=3) as f:
        yield f, State(connect(settings))


def test_a_killed_worker_is_detected_the_attempt_is_retried_on_the_survivors_and_nothing_is_left(three_workers):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    fleet, state = three_workers
    df = regression_frame(20000, seed=51)
    est = XGBEstimator(n_estimators=150, params={"max_depth": 6}, scaling_config=XGBScalingConfig(num_workers=2))
    job = est.submit(df, FEATURES, "risk", max_failures=1)
    victim_rank = wait_until(lambda: (job.status().ranks.get(1, {}).get("iteration") or 0) >= 2 and 1, 60,
                             "rank 1 to be training")
    victim = job.status().ranks[victim_rank]["worker"]
    child_pid = job.status().ranks[victim_rank]["pid"]
    proc = next(s.proc for s in fleet.started if s.name == f"worker-{victim}")
    killed_at = time.monotonic()
    os.killpg(proc.pid, signal.SIGKILL)
    wait_until(lambda: job.status().state is not JobState.RUNNING or job.status().attempt == 2, 30,
               "the lost worker to be noticed")
    assert time.monotonic() - killed_at <= 15
    booster = job.wait(180)
    st = job.status()
    assert st.state is JobState.SUCCEEDED and st.attempt == 2 and booster.num_boosted_rounds() == 150
    assert victim not in {r["worker"] for r in st.ranks.values()}
    assert "WorkerLostError" in job.record()["history"] or "ProgressTimeoutError" in job.record()["history"]
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    alive = [w for w in state.workers() if w.alive]
    assert len(alive) == 2 and all(not w.job_id for w in alive)
    assert_nothing_left(fleet, state, fleet.settings, job, artifacts=XGB_ARTIFACTS,
                        pids=[child_pid])


def test_a_killed_zygote_takes_its_running_rank_with_it_the_attempt_is_retried_and_the_worker_forks_again(
        three_workers):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    fleet, state = three_workers
    df = regression_frame(20000, seed=53)
    est = XGBEstimator(n_estimators=400, params={"max_depth": 6}, scaling_config=XGBScalingConfig(num_workers=1))
    job = est.submit(df, FEATURES, "risk", max_failures=1)
    wait_until(lambda: (job.status().ranks.get(0, {}).get("iteration") or 0) >= 2, 60, "rank 0 to be training")
    child_pid = job.status().ranks[0]["pid"]
    zygote = psutil.Process(child_pid).parent()
    assert "workers.runtime.zygote" in " ".join(zygote.cmdline())
    zygote.kill()
    booster = job.wait(180)
    st = job.status()
    assert st.state is JobState.SUCCEEDED and st.attempt == 2 and booster.num_boosted_rounds() == 400
    assert "ChildProcessError" in job.record()["history"]
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    assert_nothing_left(fleet, state, fleet.settings, job, artifacts=XGB_ARTIFACTS, pids=[child_pid])
    # every worker holds a live zygote again, and the next job's process is forked by one
    wait_until(lambda: all(len(v) == 1 for v in training_processes(fleet).values()), 30, "zygotes to be back")
    again = XGBEstimator(n_estimators=5000, params={"max_depth": 6}, scaling_config=XGBScalingConfig(num_workers=1))
    job2 = again.submit(df, FEATURES, "risk", max_failures=0)
    wait_until(lambda: (job2.status().ranks.get(0, {}).get("iteration") or 0) >= 1, 60, "the next job to train")
    parent = psutil.Process(job2.status().ranks[0]["pid"]).parent()
    assert "workers.runtime.zygote" in " ".join(parent.cmdline())
    job2.cancel()
    wait_until(lambda: job2.status().state.is_terminal, 30, "the next job to be cancelled")


def _sigterm_worker_of_rank0(fleet, job, after: int):
    """Wait for rank 0 to pass round ``after``, then SIGTERM its worker; returns (worker id, Popen)."""
    wait_until(lambda: (job.status().ranks.get(0, {}).get("iteration") or 0) >= after, 60, "rank 0 to be training")
    victim = job.status().ranks[0]["worker"]
    proc = next(s.proc for s in fleet.started if s.name == f"worker-{victim}")
    proc.send_signal(signal.SIGTERM)
    return victim, proc


def test_a_sigtermed_worker_drains_its_rank_is_retried_elsewhere_and_it_takes_no_new_gang(three_workers):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    fleet, state = three_workers
    df = regression_frame(20000, seed=52)
    est = XGBEstimator(n_estimators=3000, params={"max_depth": 6}, scaling_config=XGBScalingConfig(num_workers=1))
    job = est.submit(df, FEATURES, "risk", max_failures=1)
    victim, proc = _sigterm_worker_of_rank0(fleet, job, after=2)
    wait_until(lambda: any(w.info.worker_id == victim and w.state.value == "draining" for w in state.workers()),
               10, "the worker to report draining")
    booster = job.wait(180)
    st = job.status()
    assert st.state is JobState.SUCCEEDED and st.attempt == 2 and booster.num_boosted_rounds() == 3000
    assert st.ranks[0]["worker"] != victim
    assert "WorkerDrainedError" in job.record()["history"]
    proc.wait(timeout=30)   # the drained worker exits once its rank is gone, and deregisters
    assert victim not in {w.info.worker_id for w in state.workers()}
    assert_nothing_left(fleet, state, fleet.settings, job, artifacts=XGB_ARTIFACTS)


def test_a_sigtermed_worker_lets_a_rank_that_finishes_within_the_grace_complete(three_workers):
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    fleet, state = three_workers
    df = regression_frame(5000, seed=53)
    est = XGBEstimator(n_estimators=150, params={"max_depth": 4}, scaling_config=XGBScalingConfig(num_workers=1))
    job = est.submit(df, FEATURES, "risk", max_failures=0)
    _, proc = _sigterm_worker_of_rank0(fleet, job, after=1)
    assert job.wait(60).num_boosted_rounds() == 150 and job.status().attempt == 1
    proc.wait(timeout=30)
    assert_nothing_left(fleet, state, fleet.settings, job, artifacts=XGB_ARTIFACTS)
