"""Every working process serves Prometheus metrics; the catalogue's series move when jobs run."""
from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.models import JobState
from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.integration.helpers import FEATURES, gangway, regression_frame, wait_until

pytestmark = pytest.mark.integration


def _describe(settings) -> dict:
    return json.loads(gangway(settings, "fleet", "--json").stdout)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def test_coordinator_and_workers_count_a_job_from_submit_to_success(fleet, fleet_settings, state):
    desc = _describe(fleet_settings)
    coord_url = desc["coordinator"]["metrics_url"]
    worker_urls = [w["metrics_url"] for w in desc["workers"]]
    before = scrape(coord_url)
    before_w = [scrape(u) for u in worker_urls]
    est = XGBEstimator(n_estimators=12, scaling_config=XGBScalingConfig(num_workers=2))
    est.fit(regression_frame(3000, seed=5), FEATURES, "risk", eval_set=regression_frame(500, seed=6), timeout=120)

    after = scrape(coord_url)
    for name, labels in [("gangway_jobs_submitted_total", {"kind": "xgboost"}),
                         ("gangway_jobs_finished_total", {"kind": "xgboost", "outcome": "succeeded"}),
                         ("gangway_gang_wait_seconds_count", {"kind": "xgboost"}),
                         ("gangway_scheduling_pass_seconds_count", {})]:
        assert value(after, name, **labels) >= value(before, name, **labels) + 1, name
    assert value(after, "gangway_coordinator_up") == 1
    assert value(after, "gangway_workers", state="idle") + value(after, "gangway_workers", state="reserved") == 2
    assert ("gangway_workers", (("state", "dead"),)) in after   # every state exported, 0 when none
    assert ("gangway_queue_depth", (("queue", "gangway.coordinator"),)) in after

    after_w = [scrape(u) for u in worker_urls]
    for b, a in zip(before_w, after_w):
        assert value(a, "gangway_training_iterations_total", kind="xgboost") >= \
            value(b, "gangway_training_iterations_total", kind="xgboost") + 12
        assert value(a, "gangway_rendezvous_seconds_count", kind="xgboost") == \
            value(b, "gangway_rendezvous_seconds_count", kind="xgboost") + 1
        assert value(a, "gangway_ranks_finished_total", kind="xgboost", outcome="succeeded") == \
            value(b, "gangway_ranks_finished_total", kind="xgboost", outcome="succeeded") + 1
        fetched = value(a, "gangway_shard_fetch_bytes_total") - value(b, "gangway_shard_fetch_bytes_total")
        assert fetched > 0
        assert value(a, "gangway_cache_lookups_total") > value(b, "gangway_cache_lookups_total")
        assert value(a, "gangway_worker_heartbeats_total") > 0


def test_a_running_job_has_eval_and_iteration_gauges_that_vanish_when_it_ends(fleet, fleet_settings, state):
    coord_url = _describe(fleet_settings)["coordinator"]["metrics_url"]
    est = XGBEstimator(n_estimators=5000, params={"max_depth": 6},
                       scaling_config=XGBScalingConfig(num_workers=2))
    job = est.submit(regression_frame(20000, seed=7), FEATURES, "risk", eval_set=regression_frame(2000, seed=8))

    def gauges():
        s = scrape(coord_url)
        it = value(s, "gangway_job_iteration", job_id=job.job_id)
        ev = [lab for (n, lab), _ in s.items() if n == "gangway_job_eval_metric" and ("job_id", job.job_id) in lab]
        return (it, ev) if it >= 3 and ev else None
    try:
        it, ev = wait_until(gauges, 90, "the running job's gauges")
        assert dict(ev[0])["kind"] == "xgboost" and dict(ev[0])["metric"] == "rmse"
        assert value(scrape(coord_url), "gangway_jobs_running", kind="xgboost") == 1
    finally:
        job.cancel(wait=30)
    assert job.status().state is JobState.CANCELLED
    s = scrape(coord_url)
    assert not [k for k in s if ("job_id", job.job_id) in k[1]]
    assert value(s, "gangway_jobs_finished_total", kind="xgboost", outcome="cancelled") >= 1
