"""Rank 0's worker killed (kill -9) while it uploads the model, on a fleet of its own: a retry's files, and
only those, are published to the model folder; a job that fails there has none; no staged upload is left."""
from __future__ import annotations

import json
import os
import signal

import pytest

from common.models import JobState
from common.store import S3Store
from tests.conftest import private_fleet_settings, running_fleet
from tests.integration.helpers import wait_until

torch = pytest.importorskip("torch")

from producer.pytorch import PyTorchDistributor, PyTorchScalingConfig  # noqa: E402
from tests.integration import torch_jobs  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
FILES = 300   # ~300 PUTs: the upload lasts long enough to be caught in it


@pytest.fixture(scope="module")
def two_workers(fleet):
    from common.state import State, connect
    settings = private_fleet_settings()
    with running_fleet(settings, workers=2) as f:
        yield f, State(connect(settings))


def _kill_rank0_worker_while_uploading(fleet, job) -> None:
    def uploading():
        r0 = job.status().ranks.get(0, {})
        return r0.get("worker") if r0.get("t_uploading") else None
    victim = wait_until(uploading, 120, "rank 0 to be uploading its model")
    proc = next(s.proc for s in fleet.started if s.name == f"worker-{victim}")
    os.killpg(proc.pid, signal.SIGKILL)


def _stage(fleet) -> tuple[str, str]:
    return fleet.settings.artifact_bucket, "runs"


def test_rank0_killed_mid_upload_is_retried_and_only_the_winning_attempts_files_are_published(two_workers):
    fleet, state = two_workers
    bucket, base = _stage(fleet)
    dist = PyTorchDistributor(torch_jobs.many_files_train_func, PyTorchScalingConfig(num_workers_per_node=1))
    job = dist.submit(hyper_params={"files": FILES}, artifact_stage_location=f"s3://{bucket}/{base}",
                      max_failures=1)
    _kill_rank0_worker_while_uploading(fleet, job)
    first = job.record()["token"]
    store = S3Store(fleet.settings)
    job.wait(240)
    record = job.record()
    assert job.status().state is JobState.SUCCEEDED and record["attempt"] == "2" and record["published"] != first
    folder = [k.rsplit("/", 1)[1] for k in store.list(bucket, f"{base}/model/{job.job_id}/")]
    meta = json.loads(store.get(bucket, f"{base}/model/{job.job_id}/metadata.json"))
    assert meta["token"] == record["token"] == record["published"] and meta["attempt"] == 2
    assert sorted(folder) == sorted([*meta["files"], "metadata.json"]) and len(folder) == FILES + 2
    assert sum(name.startswith("attempt-") for name in folder) == 1   # one attempt's files, not two
    wait_until(lambda: not store.list(bucket, f"{base}/staging/{job.job_id}/"), 30,
               "the killed attempt's staged files to be deleted")


def test_a_job_that_fails_after_a_partial_upload_has_nothing_in_its_model_folder(two_workers):
    fleet, state = two_workers
    bucket, base = _stage(fleet)
    dist = PyTorchDistributor(torch_jobs.many_files_train_func, PyTorchScalingConfig(num_workers_per_node=1))
    job = dist.submit(hyper_params={"files": FILES}, artifact_stage_location=f"s3://{bucket}/{base}",
                      max_failures=0)
    _kill_rank0_worker_while_uploading(fleet, job)
    store = S3Store(fleet.settings)
    wait_until(lambda: job.status().is_terminal, 60, "the job to end")
    assert job.status().state is JobState.FAILED
    wait_until(lambda: not store.list(bucket, f"{base}/staging/{job.job_id}/"), 30,
               "the failed attempt's staged files to be deleted")
    assert store.list(bucket, f"{base}/model/{job.job_id}/") == []
