"""A job handle against a real redis-server with no coordinator: a submit nobody has taken yet."""
from __future__ import annotations

import time

import pytest

from common.errors import JobNotFoundError
from common.models import JobSpec, JobState, Resources
from common.settings import Settings

pytestmark = pytest.mark.integration


def test_a_job_submitted_while_no_coordinator_runs_stays_submitted_and_says_why(redis_url):
    from producer.client import Client, new_job_id
    from producer.jobs import TrainingJob
    settings = Settings(broker_url=redis_url)
    client = Client(settings)
    spec = JobSpec(new_job_id(), "xgboost", Resources(1), {"train": {"uri": "s3://bucket/datasets/x/"}})
    client.submit(spec)   # the message waits in the coordinator queue
    job = TrainingJob(spec.job_id, settings=settings)
    assert job.status().state is JobState.SUBMITTED and job.status().waiting == ""
    time.sleep(2.2)   # long past visibility_timeout + 30 would once have made it "not found"
    st = TrainingJob(spec.job_id, settings=settings).status()   # also from another handle
    assert st.state is JobState.SUBMITTED and "no coordinator has taken it yet" in st.waiting
    with pytest.raises(JobNotFoundError, match="never submitted there"):
        TrainingJob("20260101-000000-deadbeef", settings=settings).status()
