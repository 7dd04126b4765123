"""Writes the gangway Grafana dashboards (grafana/dashboards/*.json) from the definitions below.

    python grafana/generate.py          # rewrite the JSON files
    python grafana/generate.py --check  # exit 1 if a JSON file differs from what this script writes

Every query goes to the datasource with uid ``prometheus`` (grafana/provisioning/datasources). Rates use
``$__rate_interval`` (four scrape intervals at least: set the datasource's ``timeInterval`` to the scrape
interval); the Training dashboard has a ``job_id`` variable. The integration test
(tests/integration/test_observability.py) runs every expression here against a real Prometheus scraping
a real fleet, so a query that returns nothing fails the build.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "prometheus"}
RI = "$__rate_interval"


def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legendFormat": legend or "__auto"}


def quantiles(metric: str, by: str = "", qs=(0.5, 0.9, 0.99)) -> list[dict]:
    """p50/p90/p99 of a histogram, optionally split by a label."""
    keep = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [q(f"histogram_quantile({x}, sum by ({keep}) (rate({metric}_bucket[{RI}])))",
              f"p{round(x * 100)}{suffix}") for x in qs]


class Layout:
    """Panels placed left to right on a 24-column grid, rows of height ``h``."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = self.y = 0
        self.row_h = 0

    def add(self, kind: str, title: str, targets: list[dict], *, w: int = 12, h: int = 8, unit: str = "",
            description: str = "", stack: bool = False, decimals: int | None = None, **options) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        defaults: dict = {"unit": unit} if unit else {}
        if decimals is not None:
            defaults["decimals"] = decimals
        if kind == "timeseries":
            defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 0,
                                  "showPoints": "never", "spanNulls": False,
                                  "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
            opts = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}}
        else:
            opts = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "textMode": "auto",
                    "orientation": "auto"}
        opts.update(options)
        self.panels.append({
            "id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
            "datasource": DS, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []}, "options": opts,
            "targets": [{**t, "refId": chr(ord("A") + i), "datasource": DS, "range": True, "instant": False,
                         "editorMode": "code"} for i, t in enumerate(targets)],
        })
        self.x += w
        self.row_h = max(self.row_h, h)


def dashboard(uid: str, title: str, description: str, layout: Layout, variables: list[dict] = ()) -> dict:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["gangway"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "timezone": "browser", "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "annotations": {"list": []},
        "links": [{"title": "gangway", "type": "dashboards", "tags": ["gangway"], "asDropdown": True}],
        "templating": {"list": list(variables)}, "panels": layout.panels,
    }


# -- dashboards ----------------------------------------------------------------------------------------
def fleet() -> dict:
    lay = Layout()
    lay.add("stat", "Workers online", [q('sum(gangway_workers{state=~"idle|reserved|training"})', "online")],
            w=6, h=4, description="Live workers that can take or are running a gang (not draining, not dead).")
    lay.add("stat", "Dead workers", [q('sum(gangway_workers{state="dead"})', "dead")], w=6, h=4,
            description="Registered workers whose heartbeat lapsed (GANGWAY_HEARTBEAT_TTL).")
    lay.add("stat", "GPUs in use", [q('sum(gangway_gpus{state="in_use"})', "in use")], w=6, h=4,
            description="GPUs of live workers held by a gang.")
    lay.add("stat", "Jobs pending", [q("gangway_jobs_pending", "pending")], w=6, h=4)
    lay.add("timeseries", "Workers by state", [q("sum by (state) (gangway_workers)", "{{state}}")], stack=True,
            decimals=0, description="idle, reserved (gang placed, not yet training), training, draining, dead.")
    lay.add("timeseries", "GPUs", [q("sum by (state) (gangway_gpus)", "{{state}}")], stack=True, decimals=0,
            description="GPUs of live workers: in use by a gang, or free.")
    lay.add("timeseries", "Queue depth", [q("sum by (queue) (gangway_queue_depth)", "{{queue}}")], decimals=0,
            description="Messages waiting in each Celery queue: the coordinator's and every worker's direct queue.")
    lay.add("timeseries", "Heartbeat age", [q("max by (worker) (gangway_worker_heartbeat_age_seconds)",
                                              "{{worker}}")], unit="s",
            description="Seconds since each live worker's last heartbeat; a worker is dead past GANGWAY_HEARTBEAT_TTL.")
    lay.add("timeseries", "Scrape targets up", [q('sum by (job) (up{job=~"gangway-.*"})', "{{job}}")], decimals=0,
            description="Processes whose /metrics Prometheus reached at the last scrape.")
    lay.add("timeseries", "Worker heartbeats/s", [q(f"sum by (instance) (rate(gangway_worker_heartbeats_total[{RI}]))",
                                                    "{{instance}}")], unit="ops",
            description="Heartbeats each worker writes to the registry (one every GANGWAY_HEARTBEAT_INTERVAL).")
    lay.add("timeseries", "GPU utilisation", [q("gangway_gpu_utilization_ratio", "{{instance}} gpu {{gpu}}")],
            unit="percentunit", description="From NVML; empty on hosts without NVIDIA GPUs.")
    lay.add("timeseries", "GPU memory",
            [q("gangway_gpu_memory_used_bytes", "{{instance}} gpu {{gpu}} used"),
             q("gangway_gpu_memory_total_bytes", "{{instance}} gpu {{gpu}} total")],
            unit="bytes", description="From NVML; empty on hosts without NVIDIA GPUs.")
    return dashboard("gangway-fleet", "gangway / Fleet", "Trainer workers, GPUs, queues and heartbeats.", lay)


def jobs() -> dict:
    lay = Layout()
    lay.add("timeseries", "Jobs submitted/s", [q(f"sum by (kind) (rate(gangway_jobs_submitted_total[{RI}]))",
                                                 "{{kind}}")], unit="ops", w=8)
    lay.add("timeseries", "Jobs finished/s by outcome",
            [q(f"sum by (outcome) (rate(gangway_jobs_finished_total[{RI}]))", "{{outcome}}")], unit="ops", w=8,
            stack=True)
    lay.add("timeseries", "Failure ratio",
            [q(f'sum(rate(gangway_jobs_finished_total{{outcome="failed"}}[{RI}])) '
               f"/ sum(rate(gangway_jobs_finished_total[{RI}]))", "failed / finished")],
            unit="percentunit", w=8, description="Failed among finished jobs (cancelled count as finished).")
    lay.add("timeseries", "Jobs pending and running",
            [q("gangway_jobs_pending", "pending"), q("sum by (kind) (gangway_jobs_running)", "running {{kind}}")],
            decimals=0)
    lay.add("timeseries", "Gang wait (submit or retry to gang reserved)", quantiles("gangway_gang_wait_seconds"),
            unit="s")
    lay.add("timeseries", "Rendezvous wait at the barrier", quantiles("gangway_rendezvous_seconds"), unit="s",
            description="Per rank: shard fetched until every rank of the gang is present.")
    lay.add("timeseries", "Retries and rank failures",
            [q(f"sum by (kind) (increase(gangway_job_retries_total[{RI}]))", "retries {{kind}}"),
             q(f"sum by (reason) (increase(gangway_rank_failures_total[{RI}]))", "rank failed: {{reason}}")],
            decimals=0, description="Attempts re-queued after an infrastructure failure; failed ranks by reason.")
    lay.add("timeseries", "Submissions rejected",
            [q(f"sum by (reason) (increase(gangway_jobs_rejected_total[{RI}]))", "{{reason}}")], decimals=0,
            description="Refused by the coordinator before queueing: invalid spec, or a bad signature (security).")
    lay.add("timeseries", "Scheduling pass duration", quantiles("gangway_scheduling_pass_seconds", qs=(0.5, 0.99)),
            unit="s")
    return dashboard("gangway-jobs", "gangway / Jobs",
                     "Throughput, outcomes, gang wait, rendezvous, retries and failures.", lay)


JOB_VAR = {
    "name": "job_id", "label": "Job", "type": "query", "datasource": DS,
    "definition": "label_values(gangway_job_iteration, job_id)",
    "query": {"query": "label_values(gangway_job_iteration, job_id)", "refId": "PrometheusVariableQueryEditor"},
    "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1, "regex": "",
    "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0,
}
JOB = 'job_id=~"$job_id"'


def training() -> dict:
    lay = Layout()
    lay.add("timeseries", "Eval metric of running jobs", [q(f"gangway_job_eval_metric{{{JOB}}}",
                                                           "{{job_id}} {{dataset}}-{{metric}}")], w=24,
            description="Rank 0's newest evaluation per round (XGBoost/LightGBM) or reported metric (PyTorch).")
    lay.add("timeseries", "Iteration of running jobs", [q(f"gangway_job_iteration{{{JOB}}}", "{{job_id}}")],
            decimals=0)
    lay.add("timeseries", "Iterations/s of running jobs",
            [q(f"deriv(gangway_job_iteration{{{JOB}}}[{RI}])", "{{job_id}}")], unit="ops",
            description="Slope of rank 0's iteration (a retry that resumes from a checkpoint dips once).")
    lay.add("timeseries", "Iterations/s by worker",
            [q(f"sum by (instance, kind) (rate(gangway_training_iterations_total[{RI}]))", "{{instance}} {{kind}}")],
            unit="ops")
    lay.add("timeseries", "Iteration time", quantiles("gangway_training_iteration_seconds", by="kind"), unit="s")
    lay.add("timeseries", "Running jobs", [q("sum by (kind) (gangway_jobs_running)", "{{kind}}")], decimals=0)
    lay.add("timeseries", "Ranks finished by outcome",
            [q(f"sum by (kind, outcome) (increase(gangway_ranks_finished_total[{RI}]))", "{{kind}} {{outcome}}")],
            decimals=0)
    return dashboard("gangway-training", "gangway / Training",
                     "Progress and evaluation of running jobs; select jobs with the Job variable.", lay, [JOB_VAR])


def data_plane() -> dict:
    lay = Layout()
    lay.add("timeseries", "Shard fetch throughput by source",
            [q(f"sum by (source) (rate(gangway_shard_fetch_bytes_total[{RI}]))", "{{source}}")], unit="Bps",
            stack=True, description="Bytes of shards read from the store (S3) and from the workers' local caches.")
    lay.add("timeseries", "Shard fetch time", quantiles("gangway_shard_fetch_seconds"), unit="s",
            description="Time for one rank to fetch its whole shard.")
    lay.add("timeseries", "Cache hit ratio",
            [q(f'sum(rate(gangway_cache_lookups_total{{result="hit"}}[{RI}])) '
               f"/ sum(rate(gangway_cache_lookups_total[{RI}]))", "hit ratio")],
            unit="percentunit", description="Chunk lookups answered by the local cache (a retry should hit).")
    lay.add("timeseries", "Cache lookups/s by result",
            [q(f"sum by (result) (rate(gangway_cache_lookups_total[{RI}]))", "{{result}}")], unit="ops")
    lay.add("timeseries", "Shard fetches/s by worker",
            [q(f"sum by (instance) (rate(gangway_shard_fetch_seconds_count[{RI}]))", "{{instance}}")], unit="ops")
    lay.add("timeseries", "Bytes fetched by worker",
            [q(f"sum by (instance) (increase(gangway_shard_fetch_bytes_total[{RI}]))", "{{instance}}")],
            unit="bytes")
    return dashboard("gangway-data-plane", "gangway / Data plane",
                     "Shard fetches from the store and the local caches.", lay)


DASHBOARDS = {"fleet.json": fleet, "jobs.json": jobs, "training.json": training, "data-plane.json": data_plane}


def render(build) -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name, build in DASHBOARDS.items():
        path = OUT / name
        text = render(build)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run python grafana/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
