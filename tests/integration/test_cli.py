"""The operator commands against the running test fleet."""
from __future__ import annotations

import json

import pytest

from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.integration.helpers import FEATURES, gangway, regression_frame

pytestmark = pytest.mark.integration


def test_check_passes_when_broker_store_coordinator_and_workers_answer(fleet, fleet_settings):
    assert "coordinator and 2 workers answer" in gangway(fleet_settings, "check").stdout


def test_check_self_names_what_this_host_runs(fleet, fleet_settings):
    out = gangway(fleet_settings, "check", "--self").stdout
    runs = out.split("this host runs ", 1)[1]
    assert "coordinator" in runs and runs.count("worker ") == 2, out


def test_check_self_fails_where_no_gangway_process_of_this_host_is_registered(fleet, fleet_settings):
    import os
    import shutil
    import subprocess
    import sys
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a host of another name needs root and util-linux's unshare (a UTS namespace)")
    # The same fleet, seen from a host (a container) that runs none of its processes: another hostname.
    out = subprocess.run(["unshare", "--uts", "sh", "-c", 'hostname elsewhere && exec "$@"', "sh",
                          sys.executable, "-m", "workers.cli", "check", "--self"],
                         env={**os.environ, **fleet_settings.as_env()}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout
    assert "no live coordinator or worker registered from host 'elsewhere'" in out.stderr


def test_check_fails_when_nothing_answers(fleet_settings):
    bad = fleet_settings.replace(broker_url="redis://127.0.0.1:1/0", s3_endpoint="http://127.0.0.1:1")
    out = gangway(bad, "check", ok=False)
    assert out.returncode == 1 and "FAIL broker" in out.stderr and "FAIL store" in out.stderr


def test_fleet_lists_every_worker_with_its_resources_and_state(fleet, fleet_settings):
    desc = json.loads(gangway(fleet_settings, "fleet", "--json").stdout)
    rows = desc["workers"]
    assert sorted(r["id"] for r in rows) == sorted(fleet.worker_ids)
    assert all(r["state"] in ("idle", "reserved") and r["cpus"] >= 1 and r["gpus"] == [] for r in rows)
    assert desc["coordinator"]["alive"] is True
    urls = [desc["coordinator"]["metrics_url"]] + [r["metrics_url"] for r in rows]
    assert all(u.startswith("http://127.0.0.1:") and u.endswith("/metrics") for u in urls), urls
    assert len(set(urls)) == 3   # one endpoint per process
    assert "STATE" in gangway(fleet_settings, "fleet").stdout


def test_jobs_lists_jobs_and_show_gives_one_with_its_ranks(fleet, fleet_settings):
    est = XGBEstimator(n_estimators=2, scaling_config=XGBScalingConfig(num_workers=2))
    est.fit(regression_frame(1000, seed=11), FEATURES, "risk", timeout=60)
    job_id = est.last_job.job_id
    listing = json.loads(gangway(fleet_settings, "jobs", "--json").stdout)
    assert {"job_id": job_id, "state": "SUCCEEDED"}.items() <= next(j for j in listing if j["job_id"] == job_id).items()
    shown = json.loads(gangway(fleet_settings, "jobs", "show", job_id, "--json").stdout)
    human = gangway(fleet_settings, "jobs", "show", job_id).stdout
    assert human.startswith(f"job {job_id}: SUCCEEDED (xgboost, attempt 1 of ") and "rank 1: SUCCEEDED" in human
    assert len(human.splitlines()) < 25
    assert shown["state"] == "SUCCEEDED" and set(shown["ranks"]) == {"0", "1"}
    assert fleet_settings.s3_secret_key not in json.dumps(shown)
    assert gangway(fleet_settings, "jobs", "show", "nope", ok=False).returncode != 0


def test_parquet_under_an_s3_prefix_is_read_through_the_configured_store(fleet, fleet_settings):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from common.store import S3Store
    from producer import DataConnector
    store = S3Store(fleet_settings)
    for i in range(2):
        buf = io.BytesIO()
        pq.write_table(pa.table({"a": [i, i + 10]}), buf)
        store.put(fleet_settings.data_bucket, f"raw/events/part-{i}.parquet", buf.getvalue())
    conn = DataConnector.from_parquet(f"s3://{fleet_settings.data_bucket}/raw/events/")
    assert sorted(conn.to_pandas(settings=fleet_settings)["a"].tolist()) == [0, 1, 10, 11]


def test_a_job_id_that_does_not_exist_is_an_error_not_a_wait_forever(fleet, fleet_settings):
    from common.errors import JobNotFoundError
    from producer import TrainingJob
    with pytest.raises(JobNotFoundError, match="no job 'nope-123'"):
        TrainingJob("nope-123").wait()
    out = gangway(fleet_settings, "jobs", "cancel", "nope-123", ok=False)
    assert out.returncode != 0 and "no job 'nope-123'" in out.stderr
