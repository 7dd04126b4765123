import dataclasses
import socket

import pyarrow as pa
import pytest

from common.errors import ConfigurationError, TrainingFailedError, ValidationError
from common.models import JobSpec, JobState, Rendezvous, Resources
from common.settings import Settings, advertised_host, parse_port_block, redact_url, renew_period
from common.store import parse_s3_uri
from producer.validation import check_columns, check_table


def test_settings_read_gangway_env_and_flags_win():
    s = Settings.from_env({"GANGWAY_DATA_BUCKET": "dd", "GANGWAY_S3_SECURE": "true", "GANGWAY_CHUNK_ROWS": "7"},
                          data_bucket="flag")
    assert (s.data_bucket, s.s3_secure, s.chunk_rows) == ("flag", True, 7)


def test_bad_setting_values_name_the_variable():
    with pytest.raises(ConfigurationError, match="GANGWAY_CHUNK_ROWS='many' is not a valid int"):
        Settings.from_env({"GANGWAY_CHUNK_ROWS": "many"})
    with pytest.raises(ConfigurationError, match="GANGWAY_WORKER_PORTS"):
        parse_port_block("1-2")


def test_settings_are_frozen_and_their_repr_hides_secrets():
    s = Settings.from_env({"GANGWAY_S3_SECRET_KEY": "hunter2", "GANGWAY_BROKER_URL": "redis://:pw@h:1/0"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.data_bucket = "x"
    assert "hunter2" not in repr(s) and "pw@" not in repr(s)
    assert redact_url("rediss://user:pw@h:6380/0") == "rediss://user:***@h:6380/0"


def test_settings_survive_a_trip_through_env():
    s = Settings.from_env({}, chunk_rows=9, s3_secure=True)
    assert Settings.from_env(s.as_env()) == s


def test_s3_uris_are_checked():
    assert parse_s3_uri("s3://bucket/a/b") == ("bucket", "a/b")
    with pytest.raises(ValueError, match="not an s3:// URI"):
        parse_s3_uri("/tmp/x")
    with pytest.raises(ValueError, match="shorter than 3"):
        parse_s3_uri("s3://ab/x")


def test_job_states_know_which_are_terminal():
    assert {s for s in JobState if s.is_terminal} == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def test_job_spec_and_rendezvous_round_trip_through_json():
    spec = JobSpec("j", "xgboost", Resources(2, True, 1), {"train": {"uri": "s3://b/d/"}}, {"eta": 0.1})
    assert JobSpec.from_json(spec.to_json()) == spec
    rdv = Rendezvous(2, "a", 1, "a", 2, ("a:3", "b:3"), (3, 3), (2, 4))
    assert Rendezvous.from_dict(rdv.to_dict()) == rdv


def test_input_columns_default_to_every_column_but_label_and_weight():
    assert check_columns("train", ["a", "b", "y", "w"], None, "y", "w") == ["a", "b"]


def test_missing_columns_are_listed_with_what_the_data_has():
    with pytest.raises(ValidationError, match=r"missing input columns \['age'\] in dataset 'train' "
                                              r"\(has: \['income', 'score'\]\)"):
        check_columns("train", ["income", "score"], ["age"], "score")


def test_label_listed_as_an_input_is_refused():
    with pytest.raises(ValidationError, match="also listed in input_cols"):
        check_columns("train", ["a", "y"], ["a", "y"], "y")


def test_table_checks_name_non_numeric_columns_and_bad_labels():
    t = pa.table({"a": ["x", "y"], "y": [1.0, float("nan")]})
    types = {f.name: f.type for f in t.schema}
    with pytest.raises(ValidationError, match=r"non-numeric columns in dataset 'train': \{'a': 'string'\}"):
        check_table("train", 2, types, t, ["a"], "y", None)
    t = pa.table({"a": [1, 2], "y": [1.0, float("inf")]})
    with pytest.raises(ValidationError, match="has 1 missing, NaN or inf values"):
        check_table("train", 2, {f.name: f.type for f in t.schema}, t, ["a"], "y", None)
    with pytest.raises(ValidationError, match="fewer than the 3 workers"):
        check_table("train", 2, {f.name: f.type for f in t.schema}, None, ["a"], "y", None, world_size=3)


def test_training_failed_error_lists_every_failed_rank():
    err = TrainingFailedError("job j failed", job_id="j", rank_errors={
        1: {"type": "ValueError", "message": "bad", "traceback": "tb1"},
        0: {"type": "OSError", "message": "gone", "traceback": "tb0"}})
    assert "rank 0: OSError: gone" in str(err) and "rank 1: ValueError: bad" in str(err)
    assert "tb0" in err.tracebacks() and "tb1" in err.tracebacks()


def test_a_worker_advertises_its_address_on_the_route_to_the_broker_not_loopback():
    assert advertised_host(Settings(worker_host="10.1.2.3")).worker_host == "10.1.2.3"   # set: kept
    assert advertised_host(Settings(broker_url="redis://127.0.0.1:6399/0")).worker_host == "127.0.0.1"
    remote = Settings(broker_url="redis://198.51.100.7:6379/0")   # TEST-NET-2: routed, never contacted
    address = advertised_host(remote).worker_host
    if address == "127.0.0.1":
        pytest.skip("this host has no route off loopback")
    assert not address.startswith("127.")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((address, 0))   # one of this host's own addresses, so peers on that route can dial it


def test_a_rank_renews_its_lease_three_times_a_lease_when_leases_are_short_and_a_lease_must_last():
    assert renew_period(30.0) == 3.0
    assert renew_period(3.0) == 1.0   # every 3 s would land as a 3 s lease lapses
    assert renew_period(0.6) == pytest.approx(0.2)
    for bad in ("0", "-5"):
        with pytest.raises(ConfigurationError, match=f"GANGWAY_LEASE_SECONDS must be more than 0 seconds, got {bad}"):
            Settings.from_env({"GANGWAY_LEASE_SECONDS": bad})
