"""When rank 0 of a GBDT job writes a booster checkpoint (pure rule, no store)."""
from __future__ import annotations

from common.settings import Settings
from workers.runtime.checkpoints import checkpoint_due


def test_a_job_shorter_than_checkpoint_seconds_writes_no_checkpoint():
    # 100 rounds of 0.05 s: 5 s of training never reaches the 10 s floor
    assert not any(checkpoint_due(done, 100, 10, done * 0.05, 10.0) for done in range(1, 101))


def test_a_long_job_checkpoints_on_a_round_multiple_once_the_floor_has_passed():
    assert not checkpoint_due(190, 1000, 10, 9.99, 10.0)
    assert not checkpoint_due(201, 1000, 10, 10.05, 10.0)   # not a multiple of checkpoint_rounds
    assert checkpoint_due(210, 1000, 10, 10.5, 10.0)


def test_zero_seconds_keeps_every_checkpoint_rounds_and_never_after_the_last_round():
    assert [d for d in range(1, 51) if checkpoint_due(d, 50, 10, 0.0, 0.0)] == [10, 20, 30, 40]


def test_zero_rounds_never_checkpoints():
    assert not checkpoint_due(10, 100, 0, 60.0, 0.0)


def test_checkpoint_seconds_comes_from_the_environment_and_defaults_to_ten():
    assert Settings.from_env({}).checkpoint_seconds == 10.0
    assert Settings.from_env({"GANGWAY_CHECKPOINT_SECONDS": "0"}).checkpoint_seconds == 0.0
