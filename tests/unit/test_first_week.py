"""A data scientist's first week, as pure logic: verbose_eval, column names, by-value modules, status repr."""
from __future__ import annotations

import sys
import warnings

import pytest

from common.errors import ValidationError
from common.models import JobState
from producer.estimator import check_verbose_eval
from producer.jobs import JobStatus
from producer.validation import check_feature_names


@pytest.mark.parametrize("given, meant", [(None, None), (False, None), (0, None), (True, 1), (1, 1), (25, 25)])
def test_verbose_eval_takes_bools_and_ints_as_xgb_train_does(given, meant):
    assert check_verbose_eval(given) == meant


@pytest.mark.parametrize("bad", ["10", -1, 2.5])
def test_verbose_eval_refuses_other_values_naming_them(bad):
    with pytest.raises(ValidationError, match=rf"verbose_eval must be a bool or an integer >= 0 .* got {bad!r}"):
        check_verbose_eval(bad)


def test_feature_names_xgboost_cannot_take_are_named_with_a_rename_that_works():
    check_feature_names("XGBoost", ["age", "price_usd", "a{b}"])
    with pytest.raises(ValidationError) as info:
        check_feature_names("XGBoost", ["age", "price[usd]", "x<1"])
    text = str(info.value)
    assert "['price[usd]', 'x<1']" in text and "'price[usd]': 'price_usd_'" in text and "'x<1': 'x_1'" in text


def test_feature_names_lightgbm_cannot_take_are_named():
    with pytest.raises(ValidationError, match=r"LightGBM .* \['a:b', 'c,d'\]"):
        check_feature_names("LightGBM", ["ok", "a:b", "c,d"])


def test_the_users_own_modules_travel_by_value_and_installed_ones_by_reference(tmp_path, monkeypatch):
    import json

    import numpy

    from producer.pytorch import user_modules
    (tmp_path / "first_week_lib.py").write_text("class Model:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import first_week_lib
    Model = first_week_lib.Model

    def train_func():
        return Model(), numpy.zeros(1), json.dumps(1)

    names = {m.__name__ for m in user_modules(train_func)}
    assert "first_week_lib" in names and not names & {"numpy", "json"}
    sys.modules.pop("first_week_lib", None)


def test_modules_a_helper_of_the_script_names_travel_too(tmp_path, monkeypatch):
    """train_func -> a helper beside the script -> the helper's own import: all shipped by value (a
    bench's train_func calling a loop imported from a sibling file failed on the workers before)."""
    from producer.pytorch import user_modules
    (tmp_path / "first_week_deep.py").write_text("def loop():\n    return 1\n")
    (tmp_path / "first_week_helper.py").write_text("from first_week_deep import loop\n\n"
                                                   "def run():\n    return loop()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from first_week_helper import run

    def train_func():
        return run()

    names = {m.__name__ for m in user_modules(train_func)}
    assert {"first_week_helper", "first_week_deep"} <= names
    for name in ("first_week_helper", "first_week_deep"):
        sys.modules.pop(name, None)


def test_a_job_status_reads_in_one_line_with_the_errors_headline():
    st = JobStatus("j1", JobState.FAILED, 2, {0: {"state": "FAILED", "iteration": 7, "trace": "x" * 5000},
                                                1: {"state": "ABORTED"}},
                   {"type": "TrainingFailedError", "message": "rank 1 failed: ValueError: bad label\n" + "[bt] " * 900})
    text = repr(st)
    assert "\n" not in text and len(text) < 300
    assert "state=FAILED, attempt=2, ranks={0: FAILED@7, 1: ABORTED}" in text and "bad label" in text


def test_lightgbm_gpu_warning_points_at_the_callers_line():
    from producer.lightgbm import LightGBMEstimator, LightGBMScalingConfig
    est = LightGBMEstimator(scaling_config=LightGBMScalingConfig(num_workers=1, use_gpu=True))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        est._before_submit()
    assert seen and seen[0].filename == __file__


def test_the_root_cause_beats_the_peers_collective_echoes():
    from workers.coordinator.policy import root_cause
    echo = {"type": "XGBoostError", "message": "[10:00:01] ../rabit: Ring allreduce small failed\n  [bt] (0) 0x1"}
    gloo = {"type": "RuntimeError", "message": "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                                                "[10.0.0.2]:29500: Connection reset by peer"}
    cause = {"type": "XGBoostError", "message": "label must be in [0,1] for logistic regression"}
    assert root_cause({0: echo, 1: cause, 2: gloo}) == (1, cause)
    lost = {"type": "WorkerLostError", "message": "worker w2 stopped heartbeating"}
    assert root_cause({0: echo, 1: cause, 3: lost})[0] == 3   # an infrastructure failure explains the rest
    assert root_cause({0: {"type": "Aborted", "message": "aborted"}, 1: echo}) == (1, echo)
    assert root_cause({0: echo, 1: gloo})[0] == 0   # nothing but echoes: the lowest rank


def test_a_headline_is_the_first_line_without_the_cpp_stack():
    from workers.coordinator.policy import headline
    msg = "[10:00:01] src/data.cc:42: Check failed: valid: Label contains NaN\nStack trace:\n" + "  [bt] (0) x\n" * 500
    assert headline(msg) == "[10:00:01] src/data.cc:42: Check failed: valid: Label contains NaN"
    assert len(headline("x" * 1000)) == 300


def test_callers_echo_rank_0s_output_unless_told_otherwise():
    from producer.jobs import echoed
    assert echoed("[0]\ttrain-rmse:0.1", "0") and echoed("[gangway] checkpoint s3://x", "0")
    assert echoed("[rank 0] hello", "0") and not echoed("[rank 1] hello", "0")
    assert echoed("[rank 1] hello", "all") and echoed("[rank 3] x", "0,3") and not echoed("[rank 2] x", "0,3")
