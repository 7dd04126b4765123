"""Grafana dashboards and Prometheus alert rules, checked against a real Prometheus scraping a real fleet.

Static part: `promtool check rules` accepts compose/prometheus/rules.yml, `promtool test rules` shows each
alert fires on the condition it describes (and not when healthy), every dashboard panel queries the
datasource with uid ``prometheus``, and the JSON is what grafana/generate.py writes.

Live part: a private 2-worker fleet, Debian's ``prometheus`` scraping it every second with the scrape
config `gangway prometheus-config` prints and the rules loaded, and real jobs: a mis-signed submission
(rejected), an XGBoost job with an eval set (succeeds), a PyTorch job whose train_func raises (fails, a
rank failure), and a long XGBoost job whose rank 1 is killed (a retry, cache hits) and that stays RUNNING
while every dashboard query and every alert expression goes through ``/api/v1/query``.

Grafana variables are substituted before a query is sent: ``$__rate_interval`` -> ``1m`` (at least two
1 s samples in every window), ``$job_id`` -> the running job's id. A dashboard query passes when it returns
at least one series. An alert expression is empty when all is well, so it passes when Prometheus accepts
it and every operand of its comparisons and set operations (``and``, ``or``, ``unless``) returns series:
every metric it reads exists. NVML queries (``gangway_gpu_*``) are checked only on a host with a GPU.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from common.models import JobState
from tests.conftest import IN_CI, private_fleet_settings, running_fleet
from tests.integration.helpers import FEATURES, all_workers_idle, gangway, regression_frame, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "compose" / "prometheus" / "rules.yml"
DASHBOARDS = ROOT / "grafana" / "dashboards"
PROVISIONING = ROOT / "grafana" / "provisioning"
GRAFANA_VARS = {"$__rate_interval": "1m", "${__rate_interval}": "1m"}
NEEDS_NVML = re.compile(r"gangway_gpu_(utilization_ratio|memory_used_bytes|memory_total_bytes)")
RULE_NAMES = {"GangwayCoordinatorDown", "GangwayNoWorkersOnline", "GangwayWorkersDead", "GangwayWorkersDropped",
              "GangwayWorkerMetricsDown", "GangwayJobFailureRatioHigh", "GangwayGangWaitHigh",
              "GangwayJobsStuckPending"}


def _binary(name: str) -> str:
    path = shutil.which(name)
    if not path:
        why = f"{name} is not on PATH (Debian package prometheus)"
        pytest.fail(why) if IN_CI else pytest.skip(why)
    return path


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every target of every panel."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            out += [(path.name, panel["title"], t["expr"]) for t in panel.get("targets", [])]
    return out


def rule_exprs() -> list[tuple[str, str]]:
    """(alert name, expr) of every rule of the gangway group."""
    groups = {g["name"]: g for g in yaml.safe_load(RULES.read_text())["groups"]}
    return [(r.get("alert") or r["record"], r["expr"]) for r in groups["gangway"]["rules"]]


# -- static: files -----------------------------------------------------------------------------------------
def test_promtool_accepts_the_alert_rules():
    out = subprocess.run([_binary("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert {name for name, _ in rule_exprs()} == RULE_NAMES


def test_every_rule_has_a_for_duration_a_severity_and_a_summary_and_description():
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    for r in rules:
        assert r.get("for"), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_every_dashboard_panel_queries_the_prometheus_datasource_by_uid():
    names = sorted(p.name for p in DASHBOARDS.glob("*.json"))
    assert names == ["data-plane.json", "fleet.json", "jobs.json", "training.json"]
    uids = set()
    for name in names:
        board = json.loads((DASHBOARDS / name).read_text())
        uids.add(board["uid"])
        assert board["panels"], name
        for panel in board["panels"]:
            where = f"{name}: panel {panel['title']!r}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, where
            assert panel["targets"], f"{where} has no targets"
            for t in panel["targets"]:
                assert t["datasource"]["uid"] == "prometheus" and t["expr"].strip(), where
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
    assert len(uids) == len(names)


def test_the_training_dashboard_selects_running_jobs_by_a_job_id_variable():
    board = json.loads((DASHBOARDS / "training.json").read_text())
    (var,) = board["templating"]["list"]
    assert var["name"] == "job_id" and var["datasource"]["uid"] == "prometheus"
    assert var["query"]["query"] == "label_values(gangway_job_iteration, job_id)"
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert sum('job_id=~"$job_id"' in e for e in exprs) >= 3


def test_the_dashboards_are_what_generate_py_writes():
    out = subprocess.run([sys.executable, str(ROOT / "grafana" / "generate.py"), "--check"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_provisioning_loads_the_dashboards_folder_and_the_prometheus_datasource():
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [(d["name"], d["uid"], d["type"], d["url"]) for d in ds] == \
        [("Prometheus", "prometheus", "prometheus", "http://prometheus:9090")]
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "gangway.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


# -- static: the alerts fire on what they describe (promtool test rules) -------------------------------------
_WORKERS_HEALTHY = [{"series": f'gangway_workers{{state="{s}"}}', "values": "0x80"}
                    for s in ("reserved", "training", "draining")]


def _alert(at: str, name: str, *labels: dict) -> dict:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": lab} for lab in labels]}


PROMTOOL_TESTS = [
    {"name": "the coordinator stops answering",
     "input_series": [{"series": 'up{job="gangway-coordinator", instance="coord:9464"}', "values": "1x4 0x40"}],
     "alert_rule_test": [
         _alert("1m", "GangwayCoordinatorDown"),
         _alert("4m", "GangwayCoordinatorDown",
                {"severity": "critical", "job": "gangway-coordinator", "instance": "coord:9464"})]},
    {"name": "a worker's heartbeat lapses",
     "input_series": [{"series": 'gangway_workers{state="idle"}', "values": "2x8 1x60"},
                      {"series": 'gangway_workers{state="dead"}', "values": "0x8 1x60"}] + _WORKERS_HEALTHY,
     "alert_rule_test": [
         _alert("1m", "GangwayWorkersDead"), _alert("1m", "GangwayWorkersDropped"),
         _alert("5m", "GangwayWorkersDead", {"severity": "warning"}),
         _alert("5m", "GangwayWorkersDropped", {"severity": "warning"}),
         _alert("5m", "GangwayNoWorkersOnline")]},
    {"name": "every worker is gone",
     "input_series": [{"series": 'gangway_workers{state="idle"}', "values": "2x4 0x60"},
                      {"series": 'gangway_workers{state="dead"}', "values": "0x80"}] + _WORKERS_HEALTHY,
     "alert_rule_test": [
         _alert("5m", "GangwayNoWorkersOnline", {"severity": "critical"}),
         _alert("5m", "GangwayWorkersDead")]},
    {"name": "a worker's metrics endpoint stops answering",
     "input_series": [{"series": 'up{job="gangway-workers", instance="w1:9464"}', "values": "1 0x40"}],
     "alert_rule_test": [
         _alert("3m", "GangwayWorkerMetricsDown"),
         _alert("7m", "GangwayWorkerMetricsDown",
                {"severity": "warning", "job": "gangway-workers", "instance": "w1:9464"})]},
    {"name": "half of the jobs fail",
     "input_series": [
         {"series": 'gangway_jobs_finished_total{kind="xgboost", outcome="succeeded"}', "values": "0+1x60"},
         {"series": 'gangway_jobs_finished_total{kind="xgboost", outcome="failed"}', "values": "0+1x60"}],
     "alert_rule_test": [_alert("10m", "GangwayJobFailureRatioHigh", {"severity": "warning"})]},
    {"name": "jobs succeed, or too few end to judge",
     "input_series": [
         {"series": 'gangway_jobs_finished_total{kind="xgboost", outcome="succeeded"}', "values": "0+1x60"},
         {"series": 'gangway_jobs_finished_total{kind="xgboost", outcome="failed"}', "values": "0x60"},
         {"series": 'gangway_jobs_finished_total{kind="pytorch", outcome="failed"}', "values": "0x4 1x60"}],
     "alert_rule_test": [_alert("10m", "GangwayJobFailureRatioHigh")]},
    {"name": "gangs take minutes to be reserved",
     "input_series": [
         {"series": 'gangway_gang_wait_seconds_bucket{kind="lightgbm", le="60"}', "values": "0x120"},
         {"series": 'gangway_gang_wait_seconds_bucket{kind="lightgbm", le="300"}', "values": "0+1x120"},
         {"series": 'gangway_gang_wait_seconds_bucket{kind="lightgbm", le="+Inf"}', "values": "0+1x120"},
         {"series": 'gangway_gang_wait_seconds_bucket{kind="xgboost", le="1"}', "values": "0+1x120"},
         {"series": 'gangway_gang_wait_seconds_bucket{kind="xgboost", le="+Inf"}', "values": "0+1x120"}],
     "alert_rule_test": [
         _alert("10m", "GangwayGangWaitHigh"),
         _alert("25m", "GangwayGangWaitHigh", {"severity": "warning", "kind": "lightgbm"})]},
    {"name": "jobs pending and no gang reserved since the coordinator started",
     "input_series": [{"series": "gangway_jobs_pending", "values": "3x100"}],
     "alert_rule_test": [
         _alert("9m", "GangwayJobsStuckPending"),
         _alert("11m", "GangwayJobsStuckPending", {"severity": "warning"})]},
    {"name": "jobs pending and the last gang reserved long ago",
     "input_series": [{"series": "gangway_jobs_pending", "values": "3x100"},
                      {"series": 'gangway_gang_wait_seconds_count{kind="xgboost"}', "values": "5x100"}],
     "alert_rule_test": [_alert("20m", "GangwayJobsStuckPending", {"severity": "warning"})]},
    {"name": "jobs pending while gangs keep being reserved (a busy, healthy fleet)",
     "input_series": [{"series": "gangway_jobs_pending", "values": "3x100"},
                      {"series": 'gangway_gang_wait_seconds_count{kind="xgboost"}', "values": "0+1x100"}],
     "alert_rule_test": [_alert("20m", "GangwayJobsStuckPending")]},
]


def test_each_alert_fires_on_the_condition_it_describes_and_not_when_healthy(tmp_path):
    """promtool's rule unit tests on the real expressions, `for` and labels (annotations are left out)."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc))
    tests = [{**t, "interval": "15s"} for t in PROMTOOL_TESTS]
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yml"], "evaluation_interval": "15s", "tests": tests}))
    out = subprocess.run([_binary("promtool"), "test", "rules", "rules_test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {a["alertname"] for t in PROMTOOL_TESTS for a in t["alert_rule_test"] if a["exp_alerts"]}
    assert tested == RULE_NAMES


# -- PromQL: which parts of an expression must have data -------------------------------------------------------
_MODIFIER = re.compile(r"^\s*(bool\b\s*)?((on|ignoring)\s*\([^)]*\)\s*)?((group_left|group_right)\s*(\([^)]*\))?\s*)?")
_LITERAL = re.compile(r"^(vector\(\s*)?[-+]?[0-9.eE+]+(\s*\))?$")
_LEVELS = (("or",), ("and", "unless"), ("==", "!=", ">=", "<=", ">", "<"))


def _operator_at(expr: str, i: int, ops: tuple[str, ...]) -> str | None:
    for op in ops:
        after = expr[i + len(op):i + len(op) + 1]
        if not expr.startswith(op, i):
            continue
        if op.isalpha() and (re.match(r"\w", expr[i - 1:i]) or re.match(r"\w", after)):
            continue   # part of a name: "sort", "order_total"
        if op in (">", "<") and after == "=":
            continue
        return op
    return None


def _split_top_level(expr: str, ops: tuple[str, ...]) -> list[str]:
    """``expr`` split at binary operators ``ops`` outside brackets, braces and strings."""
    parts, start, depth, quote, i = [], 0, 0, None, 0
    while i < len(expr):
        c = expr[i]
        op = None
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = _operator_at(expr, i, ops)
        if op:
            parts.append(expr[start:i])
            start = i = i + len(op)
        else:
            i += 1
    parts.append(expr[start:])
    return [parts[0].strip()] + [_MODIFIER.sub("", p, count=1).strip() for p in parts[1:]]


def _unwrap(expr: str) -> str:
    """Drop parentheses around the whole expression."""
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, c in enumerate(expr):
            depth += c == "("
            depth -= c == ")"
            if depth == 0 and i < len(expr) - 1:
                return expr
        expr = expr[1:-1].strip()
    return expr


def operands(expr: str) -> list[str]:
    """The sub-expressions that read data: ``expr`` split at set operators and comparisons, recursively."""
    expr = _unwrap(expr)
    for ops in _LEVELS:
        parts = _split_top_level(expr, ops)
        if len(parts) > 1:
            return [leaf for p in parts for leaf in operands(p)]
    return [] if _LITERAL.match(expr) else [expr]


def test_operands_of_an_alert_expression_are_its_data_reading_parts():
    expr = ("gangway_jobs_pending > 0 and on() "
            "(sum(increase(gangway_gang_wait_seconds_count[5m])) or on() vector(0)) == 0")
    assert operands(expr) == ["gangway_jobs_pending", "sum(increase(gangway_gang_wait_seconds_count[5m]))"]
    assert operands('sum(gangway_workers{state!="dead"}) < max_over_time(sum(x{a=~"b|c"})[15m:15s])') == \
        ['sum(gangway_workers{state!="dead"})', 'max_over_time(sum(x{a=~"b|c"})[15m:15s])']
    assert operands("a / b > 0.25 and sum(c) >= bool 4") == ["a / b", "sum(c)"]
    assert operands("sort_desc(rate(x[1m]))") == ["sort_desc(rate(x[1m]))"]


# -- live: a real Prometheus scraping a real fleet ------------------------------------------------------------
class Prometheus:
    """A ``prometheus`` process of our own on a free port, with its HTTP API."""

    def __init__(self, config: dict, folder: Path) -> None:
        from workers.local import services
        self.port = services.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = folder / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [_binary("prometheus"), f"--config.file={folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._ready, 60, f"prometheus to be ready ({self.tail()})", interval=0.2)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}: {self.tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:   # 400/422 carry a JSON error body
            return json.loads(exc.read() or b"{}") or {"status": "error", "error": str(exc)}

    def query(self, expr: str) -> tuple[list, str]:
        """(series, error): the instant query's result now."""
        body = self.api("query", query=expr)
        if body.get("status") != "success":
            return [], f"{body.get('errorType', 'error')}: {body.get('error', body)}"
        return body["data"]["result"], ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _gpu_host() -> bool:
    from workers.runtime.gpus import detect_gpus
    return bool(detect_gpus())


def substitute(expr: str, job_id: str) -> str:
    for var, value in {**GRAFANA_VARS, "${job_id}": job_id, "$job_id": job_id}.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_problems(prom: Prometheus, job_id: str, only: str | None = None) -> list[str]:
    """'(dashboard, panel, expr): why' for every dashboard query that errs or returns no series."""
    problems = []
    gpu = _gpu_host()
    for board, title, raw in dashboard_targets():
        if (only and board != only) or (NEEDS_NVML.search(raw) and not gpu):
            continue
        expr = substitute(raw, job_id)
        if "$" in expr:
            problems.append(f"({board}, {title!r}, {expr}): a Grafana variable this test does not substitute")
            continue
        series, err = prom.query(expr)
        if err or not series:
            problems.append(f"({board}, {title!r}, {expr}): {err or 'no series'}")
    return problems


def rule_problems(prom: Prometheus) -> list[str]:
    """'(rules.yml, alert, expr): why' for every alert expression that Prometheus refuses or whose operands lack data."""
    problems = []
    for name, expr in rule_exprs():
        _, err = prom.query(expr)
        if err:
            problems.append(f"(rules.yml, {name}, {expr}): {err}")
            continue
        for part in operands(expr):
            series, err = prom.query(part)
            if err or not series:
                problems.append(f"(rules.yml, {name}, {part}): {err or 'no series'} (operand of {expr!r})")
    return problems


@dataclass
class Observed:
    prom: Prometheus
    running: object          # a TrainingJob kept RUNNING while the tests query


def _start_jobs(settings, state):
    """Run the jobs whose metrics the dashboards show; return the long job (RUNNING, attempt 2)."""
    from common.errors import SecurityError, TrainingFailedError
    from producer.pytorch import PyTorchDistributor, PyTorchScalingConfig
    from producer.xgboost import XGBEstimator, XGBScalingConfig
    from tests.integration import torch_jobs
    df, holdout = regression_frame(6000, seed=70), regression_frame(1000, seed=71)
    two = XGBScalingConfig(num_workers=2)

    os.environ.update(settings.replace(secret="not-the-fleet-secret").as_env())
    try:   # the coordinator refuses it: jobs_rejected_total{reason="security"}
        est = XGBEstimator(n_estimators=2, scaling_config=two)
        with pytest.raises(SecurityError):
            est.fit(df, FEATURES, "risk", timeout=60)
    finally:
        os.environ.update(settings.as_env())

    est = XGBEstimator(n_estimators=15, params={"max_depth": 3}, scaling_config=two)
    est.fit(df, FEATURES, "risk", eval_set=holdout, timeout=120)

    dist = PyTorchDistributor(torch_jobs.failing, PyTorchScalingConfig(num_workers_per_node=2))
    with pytest.raises(TrainingFailedError):
        dist.run(timeout=120)
    wait_until(lambda: all_workers_idle(state), 20, "the failed job's gang to be freed")

    est = XGBEstimator(n_estimators=100_000, params={"max_depth": 3}, scaling_config=two)
    # verbose_eval asks for the training set's metric too (only what is asked for is evaluated)
    job = est.submit(df, FEATURES, "risk", eval_set=holdout, max_failures=1, verbose_eval=1000)

    def rank1_pid():
        st = job.status()
        r = st.ranks.get(1, {})
        return r.get("pid") if st.state is JobState.RUNNING and (r.get("iteration") or 0) >= 3 else None
    os.kill(wait_until(rank1_pid, 90, "rank 1 of the long job to train"), signal.SIGKILL)   # a retry

    def retried_and_training():
        st = job.status()
        return st.state is JobState.RUNNING and st.attempt == 2 and (st.ranks.get(0, {}).get("iteration") or 0) >= 3
    wait_until(retried_and_training, 90, "the long job's second attempt to train")
    return job


@pytest.fixture(scope="module")
def observed():
    _binary("prometheus")
    settings = private_fleet_settings(secret="observability-fleet-secret")
    folder = Path(tempfile.mkdtemp(prefix="gangway-prometheus-"))
    prom = job = None
    with running_fleet(settings, workers=2):
        from common.state import State, connect
        state = State(connect(settings))
        try:
            out = gangway(settings, "prometheus-config")
            config = yaml.safe_load(out.stdout)
            config["global"] = {**config.get("global", {}), "scrape_interval": "1s", "evaluation_interval": "1s"}
            config["rule_files"] = [str(RULES)]
            prom = Prometheus(config, folder)
            job = _start_jobs(settings, state)
            # rate() needs two samples in its window; the job's gauges need a scrape: poll, bounded.
            deadline = time.monotonic() + 45
            while (dashboard_problems(prom, job.job_id) or rule_problems(prom)) and time.monotonic() < deadline:
                time.sleep(1)
            yield Observed(prom, job)
        finally:
            if job is not None and not job.status().is_terminal:
                job.cancel(wait=30)
            if prom is not None:
                prom.stop()
            shutil.rmtree(folder, ignore_errors=True)


def _still_running(obs: Observed) -> None:
    st = obs.running.status()
    assert st.state is JobState.RUNNING, f"the long job {obs.running.job_id} ended early: {st}"


def test_prometheus_scrapes_the_coordinator_and_every_worker_from_gangway_prometheus_config(observed):
    def targets():
        active = observed.prom.api("targets")["data"]["activeTargets"]
        return active if active and all(t["health"] == "up" for t in active) else None
    active = wait_until(targets, 15, "every scrape target to be up")
    jobs = sorted(t["labels"]["job"] for t in active)
    assert jobs == ["gangway-coordinator", "gangway-workers", "gangway-workers"], active


@pytest.mark.parametrize("board", ["fleet.json", "jobs.json", "training.json", "data-plane.json"])
def test_every_query_of_the_dashboard_returns_series_from_a_fleet_running_jobs(observed, board):
    _still_running(observed)
    problems = dashboard_problems(observed.prom, observed.running.job_id, only=board)
    assert not problems, "queries with no data:\n" + "\n".join(problems)


def test_every_alert_expression_is_accepted_and_every_metric_it_reads_has_data(observed):
    problems = rule_problems(observed.prom)
    assert not problems, "alert expressions:\n" + "\n".join(problems)


def test_prometheus_evaluates_every_alert_rule_without_error(observed):
    def evaluated():
        groups = observed.prom.api("rules", type="alert")["data"]["groups"]
        rules = [r for g in groups if g["name"] == "gangway" for r in g["rules"]]
        done = [r for r in rules if r.get("lastEvaluation", "").startswith("2") and
                not r["lastEvaluation"].startswith("0001")]
        return rules if rules and len(done) == len(rules) else None
    rules = wait_until(evaluated, 15, "every rule of the gangway group to be evaluated")
    assert {r["name"] for r in rules} == RULE_NAMES
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad
    active = [(r["name"], r["state"]) for r in rules if r["state"] != "inactive"]
    assert not active, f"alerts pending or firing on a healthy fleet (one failed job of three): {active}"


def test_the_job_id_variable_lists_the_running_job_and_its_panels_show_its_eval_metric(observed):
    _still_running(observed)
    values = observed.prom.api("label/job_id/values", **{"match[]": "gangway_job_iteration"})["data"]
    assert observed.running.job_id in values
    series, err = observed.prom.query(f'gangway_job_eval_metric{{job_id="{observed.running.job_id}"}}')
    assert not err
    names = {(s["metric"]["dataset"], s["metric"]["metric"]) for s in series}
    assert ("eval", "rmse") in names and ("train", "rmse") in names, names


def test_outcomes_retries_rank_failures_and_rejections_of_the_jobs_run_are_counted(observed):
    def total(expr: str) -> float:
        series, err = observed.prom.query(expr)
        assert not err, err
        return sum(float(s["value"][1]) for s in series)
    assert total('gangway_jobs_finished_total{outcome="succeeded"}') >= 1
    assert total('gangway_jobs_finished_total{outcome="failed"}') >= 2   # the rejected and the PyTorch job
    assert total('gangway_jobs_rejected_total{reason="security"}') == 1
    assert total('gangway_rank_failures_total{kind="pytorch", reason="training_error"}') >= 1
    assert total('gangway_rank_failures_total{kind="xgboost", reason="process_died"}') >= 1
    assert total('gangway_job_retries_total{kind="xgboost"}') == 1
    assert total('gangway_cache_lookups_total{result="hit"}') > 0   # the retry read its shard from the cache


def test_the_running_job_s_series_disappear_from_prometheus_once_it_is_cancelled(observed):
    """Runs last: it ends the job the other tests query."""
    job_id = observed.running.job_id
    assert observed.prom.query(f'gangway_job_iteration{{job_id="{job_id}"}}')[0]
    assert observed.running.cancel(wait=30).state is JobState.CANCELLED
    wait_until(lambda: not observed.prom.query(f'{{job_id="{job_id}"}}')[0], 15,
               f"the series of {job_id} to go stale")
    wait_until(lambda: observed.prom.query('gangway_jobs_finished_total{outcome="cancelled"}')[0], 15,
               "the cancelled outcome to be scraped")
