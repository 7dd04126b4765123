"""A data scientist's first week against the real fleet: Ctrl-C, waiting reasons, reattach, prints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from common.models import JobState
from producer import TrainingJob
from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.integration.helpers import (
    FEATURES,
    XGB_ARTIFACTS,
    all_workers_idle,
    assert_nothing_left,
    regression_frame,
    rmse,
    wait_until,
)

pytestmark = pytest.mark.integration

FIT_FOREVER = textwrap.dedent("""
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    from tests.integration.helpers import FEATURES, regression_frame
    est = XGBEstimator(n_estimators=1_000_000, scaling_config=XGBScalingConfig(num_workers=2))
    est.fit(regression_frame(20000, seed=141), FEATURES, "risk")
""")


def test_ctrl_c_in_fit_says_why_it_waits_then_cancels_its_job_and_frees_the_gang(fleet, state, fleet_settings, tmp_path):
    blocker = XGBEstimator(n_estimators=1_000_000, scaling_config=XGBScalingConfig(num_workers=2)).submit(
        regression_frame(3000, seed=140), FEATURES, "risk")
    wait_until(lambda: blocker.status().state is JobState.RUNNING, 60, "the blocker to hold the gang")
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", FIT_FOREVER], stderr=f, stdout=subprocess.DEVNULL,
                                env={**os.environ}, cwd=os.getcwd())
    try:
        wait_until(lambda: _said(err, "is PENDING: waiting for 2 workers: 0 of 2 registered workers are free (held by job "
                                f"{blocker.job_id})"), 90, "fit() to say why it waits")
        job_id = err.read_text().split("gangway: job ", 1)[1].split()[0]
        blocker.cancel(wait=10)
        job = TrainingJob(job_id)
        wait_until(lambda: (job.status().ranks.get(0, {}).get("iteration") or 0) >= 1, 60, "the fit's job to train")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text(errors="replace")
    assert f"interrupted: cancelling job {job_id} (Ctrl-C again to leave it running)" in text, text
    assert f"job {job_id} is CANCELLED" in text and "KeyboardInterrupt" in text
    assert job.status().state is JobState.CANCELLED
    wait_until(lambda: all_workers_idle(state), 10, "the gang to be freed")
    assert_nothing_left(fleet, state, fleet_settings, job)
    assert_nothing_left(fleet, state, fleet_settings, blocker)


def test_ctrl_c_in_wait_of_a_submitted_job_detaches_and_leaves_it_running(fleet, state, capsys):
    job = XGBEstimator(n_estimators=1_000_000, scaling_config=XGBScalingConfig(num_workers=1)).submit(
        regression_frame(2000, seed=142), FEATURES, "risk")
    wait_until(lambda: job.status().state is JobState.RUNNING, 60, "the job to run")
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            job.wait(60)
        assert job.status().state is JobState.RUNNING
        assert f"stopped waiting; job {job.job_id} goes on (TrainingJob('{job.job_id}').wait() reattaches" \
            in capsys.readouterr().err
    finally:
        timer.cancel()
        job.cancel(wait=10)
    wait_until(lambda: all_workers_idle(state), 10, "the worker to be freed")


def test_a_job_reattached_by_id_returns_the_booster_and_its_eval_results(fleet, state, fleet_settings):
    df = regression_frame(4000, seed=143)
    est = XGBEstimator(n_estimators=8, scaling_config=XGBScalingConfig(num_workers=2))
    booster = est.fit(df.iloc[:3000], FEATURES, "risk", eval_set=df.iloc[3000:], verbose_eval=True)
    other_process_view = TrainingJob(est.last_job.job_id)   # what another process gets from the id alone
    again = other_process_view.wait(30)
    assert type(again) is type(booster) and again.num_boosted_rounds() == 8
    import xgboost as xgb
    X = xgb.DMatrix(df[FEATURES].to_numpy(), feature_names=FEATURES)
    assert rmse(again.predict(X), booster.predict(X)) == 0.0
    assert other_process_view.get_eval_results() == est.get_eval_results()
    assert_nothing_left(fleet, state, fleet_settings, est.last_job, artifacts=XGB_ARTIFACTS)


@pytest.mark.parametrize("verbose_eval", [False, 0])
def test_verbose_eval_false_and_zero_train_and_print_no_eval_lines(fleet, capsys, verbose_eval):
    df = regression_frame(2000, seed=144)
    est = XGBEstimator(n_estimators=3, scaling_config=XGBScalingConfig(num_workers=1))
    assert est.fit(df, FEATURES, "risk", eval_set=df.iloc[:500], verbose_eval=verbose_eval).num_boosted_rounds() == 3
    out = capsys.readouterr()
    assert "eval-rmse" not in out.out and "dataset 'train': 2,000 rows" in out.err


def test_fit_says_when_the_data_was_already_in_the_store(fleet, capsys):
    df = regression_frame(2500, seed=145)
    est = XGBEstimator(n_estimators=2, scaling_config=XGBScalingConfig(num_workers=1))
    est.fit(df, FEATURES, "risk")
    first = capsys.readouterr().err
    est.fit(df, FEATURES, "risk")
    second = capsys.readouterr().err
    assert "kB uploaded" in first and "dataset 'train': 2,500 rows, already in the store, 0 bytes uploaded" in second


def test_column_names_xgboost_forbids_are_named_at_the_caller(fleet):
    from common.errors import ValidationError
    df = regression_frame(500, seed=146).rename(columns={"income": "income[usd]"})
    with pytest.raises(ValidationError, match=r"XGBoost does not accept feature names .*\['income\[usd\]'\]"):
        XGBEstimator(n_estimators=2, scaling_config=XGBScalingConfig(num_workers=1)).fit(
            df, ["age", "income[usd]", "score"], "risk")


def test_a_train_func_using_the_users_own_module_runs_on_workers_that_cannot_import_it(fleet, tmp_path, monkeypatch):
    from producer.pytorch import PyTorchDistributor, PyTorchScalingConfig
    (tmp_path / "fw_otherlib.py").write_text("def scale(x):\n    return x * 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))   # this process only: the workers never see the folder
    import fw_otherlib

    def train_func():
        from producer.pytorch import get_context
        ctx = get_context()
        ctx.get_metrics_reporter().log_metrics({"value": fw_otherlib.scale(ctx.get_rank() + 1)})

    dist = PyTorchDistributor(train_func, PyTorchScalingConfig(num_nodes=1, num_workers_per_node=1))
    result = dist.run(timeout=120)
    assert result.get_metrics()["value"] == 3
    reattached = TrainingJob(dist.last_job.job_id).wait(30)   # the distributor's result, from the id alone
    assert reattached.get_metrics() == result.get_metrics() and reattached.get_model_dir() == result.get_model_dir()
    sys.modules.pop("fw_otherlib", None)


def _said(path, text: str) -> bool:
    return text in path.read_text(errors="replace")


def _quiet_rank_1():
    import time

    from producer.pytorch import get_context
    ctx = get_context()
    if ctx.get_rank() == 1:
        time.sleep(20)   # longer than the fleet's GANGWAY_PROGRESS_TIMEOUT (15 s), logging nothing
    else:
        ctx.get_metrics_reporter().log_metrics({"done": 1})


def _torch(n: int = 2):
    from producer.pytorch import PyTorchDistributor, PyTorchScalingConfig
    return lambda f: PyTorchDistributor(f, PyTorchScalingConfig(num_nodes=1, num_workers_per_node=n))


def test_a_torch_rank_that_logs_nothing_for_longer_than_the_progress_timeout_is_not_hung(fleet, fleet_settings):
    assert fleet_settings.progress_timeout < 20
    result = _torch()(_quiet_rank_1).run(timeout=120)
    assert result.get_metrics() == {"done": 1}


def test_a_jobs_own_progress_timeout_fails_a_silent_torch_rank(fleet):
    from common.errors import TrainingFailedError
    with pytest.raises(TrainingFailedError, match=r"rank 1 .*reported no progress for 5s") as info:
        _torch()(_quiet_rank_1).run(timeout=120, progress_timeout=5, max_failures=0)
    assert info.value.rank_errors[1]["type"] == "ProgressTimeoutError"


def _chatty():
    import logging
    import sys

    from producer.pytorch import get_context
    rank = get_context().get_rank()
    print(f"hello from rank {rank}")
    logging.getLogger("user").warning("a warning from rank %s", rank)
    print(f"to stderr from rank {rank}", file=sys.stderr)
    if rank == 1:
        print("about to fail")
        raise ValueError("bad shard on rank 1")


def test_prints_and_logs_of_every_rank_reach_the_job_log_and_rank_0s_the_callers_console(fleet, capsys):
    from common.errors import TrainingFailedError
    dist = _torch()(_chatty)
    with pytest.raises(TrainingFailedError, match="rank 1 failed: ValueError: bad shard on rank 1") as info:
        dist.run(timeout=120, max_failures=0)
    log = "\n".join(dist.last_job.logs())
    for rank in (0, 1):
        assert f"[rank {rank}] hello from rank {rank}" in log and f"[rank {rank}] to stderr from rank {rank}" in log
        assert f"a warning from rank {rank}" in log
    out = capsys.readouterr().out
    assert "[rank 0] hello from rank 0" in out and "[rank 1]" not in out   # GANGWAY_ECHO_RANKS=0
    assert "about to fail" in info.value.rank_errors[1]["output"] and "about to fail" in info.value.tracebacks()


def _exits_quietly():
    import os
    os._exit(0)


def test_a_train_func_that_calls_os_exit_0_fails_instead_of_succeeding(fleet):
    from common.errors import TrainingFailedError
    with pytest.raises(TrainingFailedError, match="exited with code 0 before reporting completion") as info:
        _torch(1)(_exits_quietly).run(timeout=120)
    assert info.value.rank_errors[0]["type"] == "IncompleteTrainingError"
    assert len(info.value.attempts) == 1   # the user's code: not retried


def _one_rank_fails_inside_the_collective():
    import torch
    import torch.distributed as dist

    from producer.pytorch import get_context
    ctx = get_context()
    dist.init_process_group(ctx.get_default_backend())
    if ctx.get_rank() == 1:
        raise ValueError("inf in rank 1's features")
    t = torch.ones(1)
    dist.all_reduce(t)   # rank 0 waits for a peer that is gone: its error is an echo


def test_the_failing_ranks_error_is_the_headline_not_its_peers_socket_echo(fleet, state):
    from common.errors import TrainingFailedError
    with pytest.raises(TrainingFailedError) as info:
        _torch()(_one_rank_fails_inside_the_collective).run(timeout=120, max_failures=0)
    headline = str(info.value).splitlines()[0]
    assert "rank 1 failed: ValueError: inf in rank 1's features" in headline, str(info.value)
    assert all(len(line) < 600 for line in str(info.value).splitlines())
    wait_until(lambda: all_workers_idle(state), 10, "the gang to be freed")


def _logs_a_tensor():
    import torch

    from producer.pytorch import get_context
    get_context().get_metrics_reporter().log_metrics({"losses": torch.tensor([0.3, 0.2, 0.1])})


def test_a_non_scalar_metric_is_refused_naming_it(fleet):
    from common.errors import TrainingFailedError
    with pytest.raises(TrainingFailedError, match=r"metric 'losses' must be a number.* torch.Tensor of 3 elements"):
        _torch(1)(_logs_a_tensor).run(timeout=120)


def test_only_what_was_asked_for_is_evaluated(fleet):
    df = regression_frame(3000, seed=147)
    est = XGBEstimator(n_estimators=5, scaling_config=XGBScalingConfig(num_workers=1))
    est.fit(df, FEATURES, "risk")
    assert est.get_eval_results() == {}   # no eval set, no lines: no metric computed at all
    est.fit(df.iloc[:2500], FEATURES, "risk", eval_set=df.iloc[2500:])
    assert set(est.get_eval_results()) == {"eval"}   # the training set only when verbose_eval asks for lines
    est.fit(df.iloc[:2500], FEATURES, "risk", eval_set=df.iloc[2500:], verbose_eval=True)
    assert set(est.get_eval_results()) == {"train", "eval"}


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_the_last_rounds_eval_line_is_printed_when_early_stopping_ends_between_lines(fleet, framework):
    import numpy as np
    rng = np.random.default_rng(148)
    df = regression_frame(4000, seed=148)
    noise = df.iloc[3000:].copy()
    noise["risk"] = rng.permutation(noise["risk"].to_numpy())   # an eval set the model cannot improve on
    if framework == "xgboost":
        est = XGBEstimator(n_estimators=500, params={"learning_rate": 0.3}, scaling_config=XGBScalingConfig(num_workers=1))
    else:
        from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
        est = LightGBMEstimator(n_estimators=500, params={"learning_rate": 0.3, "verbose": -1},
                                scaling_config=LightGBMScalingConfig(num_workers=1))
    est.fit(df.iloc[:3000], FEATURES, "risk", eval_set=noise, verbose_eval=100, early_stopping_rounds=3)
    rounds = len(next(iter(est.get_eval_results()["eval"].values())))
    assert rounds < 100   # it stopped before the second printed line
    lines = [ln for ln in est.last_job.logs() if not ln.startswith(("[rank ", "[gangway]"))]
    assert lines[0].startswith("[0]\t") and lines[-1].startswith(f"[{rounds - 1}]\t"), lines
