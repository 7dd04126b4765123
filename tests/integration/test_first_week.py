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
        wait_until(lambda: _said(err, "is PENDING: waiting for 2 workers: 0 of 2 live workers are free (held by job "
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
