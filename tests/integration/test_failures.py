"""Faults really inflicted on the fleet: a training process killed mid-job."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from common.errors import TrainingFailedError
from common.models import JobState
from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.integration.helpers import (
    FEATURES,
    XGB_ARTIFACTS,
    all_workers_idle,
    assert_nothing_left,
    regression_frame,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def _kill_rank_child_when_training(job, rank: int, after: int = 2) -> int:
    def training_pid():
        st = job.status()
        r = st.ranks.get(rank, {})
        return r.get("pid") if st.state is JobState.RUNNING and (r.get("iteration") or 0) >= after else None
    pid = wait_until(training_pid, 60, f"rank {rank} to be training")
    os.kill(pid, signal.SIGKILL)
    return pid


def _checkpoint_stored(settings, job, rounds: int) -> bool:
    """A checkpoint of at least ``rounds`` rounds is recorded (older ones are pruned: GANGWAY_CHECKPOINT_KEEP)."""
    return any(r >= rounds for r in job.client.state.checkpoints(job.job_id))


def _long_job(seed: int) -> tuple[XGBEstimator, object]:
    df = regression_frame(20000, seed=seed)
    est = XGBEstimator(n_estimators=150, params={"max_depth": 6}, scaling_config=XGBScalingConfig(num_workers=2))
    return est, df


def test_a_killed_training_process_fails_the_attempt_and_the_retry_resumes_from_its_checkpoint(
        fleet, state, fleet_settings):
    est, df = _long_job(41)
    est.n_estimators = 600
    job = est.submit(df, FEATURES, "risk", max_failures=1, verbose_eval=100)
    # Checkpoints upload on a background thread (the first PUT of a process takes ~0.2 s, ~40 rounds
    # here): kill only once the round-20 one is recorded, or the retry may rightly resume from round 10.
    wait_until(lambda: _checkpoint_stored(fleet_settings, job, 20), 60, "the round-20 checkpoint to be stored")
    pid = _kill_rank_child_when_training(job, 1, after=25)
    booster = job.wait(180)
    assert booster.num_boosted_rounds() == 600
    resumed = {r["summary"]["resumed_from_round"] for r in job.status().ranks.values()}
    assert len(resumed) == 1 and resumed.pop() >= 20   # every rank resumed from the same checkpoint
    assert any("resuming from the checkpoint" in ln for ln in job.logs())
    st = job.status()
    assert st.state is JobState.SUCCEEDED and st.attempt == 2
    history = job.record().get("history")
    assert '"ChildProcessError"' in history and "retrying" in history
    assert_nothing_left(fleet, state, fleet_settings, job, artifacts=XGB_ARTIFACTS,
                        pids=[pid])


def test_with_max_failures_0_the_first_infrastructure_failure_fails_the_job_with_its_history(
        fleet, state, fleet_settings):
    est, df = _long_job(42)
    job = est.submit(df, FEATURES, "risk", max_failures=0)
    pid = _kill_rank_child_when_training(job, 0)
    with pytest.raises(TrainingFailedError) as info:
        job.wait(120)
    err = info.value
    assert err.rank_errors[0]["type"] == "ChildProcessError" and "signal 9" in err.rank_errors[0]["message"]
    assert len(err.attempts) == 1 and "max_failures=0" in err.attempts[0]["decision"]
    assert job.status().attempt == 1
    assert_nothing_left(fleet, state, fleet_settings, job, pids=[pid])


def test_an_error_of_the_training_code_is_not_retried(fleet, state, fleet_settings):
    torch_jobs = pytest.importorskip("tests.integration.torch_jobs")
    from producer.pytorch import PyTorchDistributor, PyTorchScalingConfig
    dist = PyTorchDistributor(torch_jobs.failing, PyTorchScalingConfig(num_workers_per_node=2))
    with pytest.raises(TrainingFailedError) as info:
        dist.run(timeout=120, max_failures=3)
    assert info.value.rank_errors[1]["type"] == "ValueError"
    assert dist.last_job.status().attempt == 1
    assert "not retried" in info.value.attempts[0]["decision"]
    assert_nothing_left(fleet, state, fleet_settings, dist.last_job)


def test_a_hung_rank_is_detected_by_its_silence_and_the_attempt_is_retried(fleet, state, fleet_settings):
    est, df = _long_job(44)
    job = est.submit(df, FEATURES, "risk", max_failures=1)

    def training_pid():
        r = job.status().ranks.get(1, {})
        return r.get("pid") if (r.get("iteration") or 0) >= 2 else None
    pid = wait_until(training_pid, 60, "rank 1 to be training")
    os.kill(pid, signal.SIGSTOP)   # a rank stuck in a collective: alive, silent
    try:
        booster = job.wait(120)
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
    assert booster.num_boosted_rounds() == 150 and job.status().attempt == 2
    assert '"ProgressTimeoutError"' in job.record()["history"]
    assert_nothing_left(fleet, state, fleet_settings, job, artifacts=XGB_ARTIFACTS,
                        pids=[pid])


def test_the_whole_job_timeout_ends_a_running_job_naming_the_argument(fleet, state, fleet_settings):
    from common.errors import JobTimeoutError
    est, df = _long_job(45)
    est.n_estimators = 100000
    with pytest.raises(JobTimeoutError, match=r"job timeout of 4s passed while running .*`timeout` argument"):
        est.fit(df, FEATURES, "risk", timeout=4)
    assert_nothing_left(fleet, state, fleet_settings, est.last_job)


def test_a_long_rank_is_delivered_once_even_with_a_3s_visibility_timeout(fleet, state, fleet_settings):
    assert fleet_settings.visibility_timeout == 3.0
    from common import keys
    est, df = _long_job(46)
    est.n_estimators = 4000   # > 9 s on a quiet box (1,500 rounds took 8.5 s once small jobs got faster)
    job = est.submit(df, FEATURES, "risk", max_failures=0)
    job.wait(300)
    started = float(job.record()["started_at"])
    assert float(job.record()["finished_at"]) - started > 3 * fleet_settings.visibility_timeout
    token = job.record()["token"]
    assert state.r.hgetall(keys.deliveries(job.job_id, token)) == {"0": "1", "1": "1"}
    assert job.status().attempt == 1
    assert_nothing_left(fleet, state, fleet_settings, job, artifacts=XGB_ARTIFACTS)


def test_a_redelivered_or_stale_train_rank_is_a_no_op(fleet, state, fleet_settings):
    """Replay an old attempt's task at a worker: it must not train, write, or touch the worker's reservation."""
    import json

    from common import keys
    est = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=2))
    est.fit(regression_frame(2000, seed=47), FEATURES, "risk", timeout=60)
    job = est.last_job
    rec = job.record()
    ranks_before = state.ranks(job.job_id)
    payload = {"job_id": job.job_id, "token": rec["token"], "attempt": 1, "rank": 0,
               "worker_id": ranks_before[0]["worker"], "use_gpu": False, "rendezvous": json.loads(rec["rendezvous"]),
               "host_gpus": [], "spec": json.loads(rec["spec"])}
    job.client.app.send_task("gangway.train_rank", args=[payload],
                             queue=keys.worker_queue(ranks_before[0]["worker"]))
    wait_until(lambda: state.r.hget(keys.deliveries(job.job_id, rec["token"]), "0") == "2", 20,
               "the replayed task to be delivered")
    time.sleep(0.5)
    assert state.ranks(job.job_id) == ranks_before and job.status().state is JobState.SUCCEEDED
    assert all_workers_idle(state)


def test_killing_the_coordinator_loses_no_job_and_a_restarted_one_finishes_them(fleet, state, fleet_settings):
    from common import keys
    running_est, df = _long_job(48)
    running = running_est.submit(df, FEATURES, "risk", max_failures=0)
    wait_until(lambda: (running.status().ranks.get(0, {}).get("iteration") or 0) >= 1, 60, "the first job to train")
    pending = XGBEstimator(n_estimators=5, scaling_config=XGBScalingConfig(num_workers=2)).submit(
        regression_frame(2000, seed=49), FEATURES, "risk")
    wait_until(lambda: pending.status().state is JobState.PENDING, 20, "the second job to queue")
    old = next(s for s in fleet.started if s.name.startswith("coordinator"))
    os.killpg(old.proc.pid, signal.SIGKILL)
    old.proc.wait(timeout=10)
    fleet.started.remove(old)
    wait_until(lambda: not state.coordinator_alive(), 20, "the coordinator's heartbeat to lapse")
    fleet._start_coordinator()   # a fresh coordinator reconciles from Redis alone
    assert running.wait(120).num_boosted_rounds() == 150 and running.status().attempt == 1
    assert pending.wait(120).num_boosted_rounds() == 5
    for job in (running, pending):
        assert_nothing_left(fleet, state, fleet_settings, job, artifacts=XGB_ARTIFACTS)
    assert not state.r.smembers(keys.RUNNING)


def test_a_queued_gang_is_not_starved_by_a_stream_of_small_jobs_and_priorities_are_honoured(
        fleet, state, fleet_settings):
    def job(n_workers: int, rounds: int, seed: int, priority: int = 0):
        est = XGBEstimator(n_estimators=rounds, params={"max_depth": 6},
                           scaling_config=XGBScalingConfig(num_workers=n_workers))
        return est.submit(regression_frame(8000, seed=seed), FEATURES, "risk", priority=priority)

    blocker = job(1, 400, 70)                       # holds one of the two workers for a while
    wait_until(lambda: blocker.status().state is JobState.RUNNING, 30, "the blocker to run")
    gang = job(2, 5, 71)                            # needs both workers
    small = [job(1, 5, 72 + i) for i in range(3)]   # would fit the free worker right away
    urgent = job(1, 5, 80, priority=5)              # submitted last, placed first
    for j in [blocker, gang, *small, urgent]:
        j.wait(180)
    started = {j.job_id: float(j.record()["started_at"]) for j in [gang, *small, urgent]}
    assert started[urgent.job_id] < started[gang.job_id]      # priority beats FIFO
    assert all(started[gang.job_id] < started[s.job_id] for s in small)   # no backfill past the gang
    for j in [blocker, gang, *small, urgent]:
        assert j.status().attempt == 1
        assert_nothing_left(fleet, state, fleet_settings, j, artifacts=XGB_ARTIFACTS)


def test_cancelling_a_pending_job_never_places_it_and_a_running_one_frees_its_gang(fleet, state, fleet_settings):
    est, df = _long_job(81)
    est.n_estimators = 100000
    running = est.submit(df, FEATURES, "risk")
    wait_until(lambda: (running.status().ranks.get(0, {}).get("iteration") or 0) >= 1, 60, "the first job to train")
    pending = XGBEstimator(n_estimators=5, scaling_config=XGBScalingConfig(num_workers=2)).submit(
        regression_frame(2000, seed=82), FEATURES, "risk")
    wait_until(lambda: pending.status().state is JobState.PENDING, 20, "the second job to queue")
    assert pending.cancel(wait=10).state is JobState.CANCELLED
    assert pending.status().attempt == 0 and running.status().state is JobState.RUNNING
    cancelled_at = time.monotonic()
    assert running.cancel(wait=10).state is JobState.CANCELLED
    wait_until(lambda: all_workers_idle(state), 10, "the gang to be freed")
    assert time.monotonic() - cancelled_at <= 10
    assert_nothing_left(fleet, state, fleet_settings, running)
    assert_nothing_left(fleet, state, fleet_settings, pending)
    with pytest.raises(Exception, match="cancelled"):
        pending.wait(5)
    # Revocations have a path that does not warn (no result backend is the design, not an error).
    logs = {s.name: s.log.read_text(errors="replace") for s in fleet.started if s.name.startswith("worker-")}
    assert all(f"{running.job_id}." not in text or "as revoked in backend" not in text for text in logs.values())
    assert any(f"{running.job_id}." in text for text in logs.values()), "the workers never saw the revoke"
