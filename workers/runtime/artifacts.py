"""Rank 0's artifacts: the model, eval results and metadata under s3://<artifact-bucket>/model/<job_id>/."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

from common.settings import Settings
from common.store import S3Store

MODEL_FILES = ("model.ubj", "model.txt", "eval_results.json")


def artifact_prefix(job_id: str) -> str:
    return f"model/{job_id}/"


_stores: dict[Settings, S3Store] = {}


def artifact_store(settings: Settings) -> S3Store:
    """One S3 client per process (boto3 takes ~0.2 s to build one)."""
    if settings not in _stores:
        _stores[settings] = S3Store(settings)
    return _stores[settings]


def upload_artifacts(settings: Settings, state, run, workdir: str) -> str:
    """Upload the model files rank 0's child wrote, plus metadata.json; returns the artifact URI."""
    store = artifact_store(settings)
    bucket, prefix = settings.artifact_bucket, artifact_prefix(run.job_id)
    store.ensure_bucket(bucket)
    uploaded = []
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            store.put_file(bucket, prefix + name, path)
            uploaded.append(name)
    job = state.job(run.job_id) or {}
    meta = {
        "job_id": run.job_id,
        "attempt": int(job.get("attempt") or 0),
        "spec": json.loads(job.get("spec") or "{}"),
        "gang": json.loads(job.get("gang") or "{}"),
        "timings": {"submitted_at": _f(job.get("submitted_at")), "started_at": _f(job.get("started_at")),
                    "uploaded_at": time.time()},
        "ranks": {str(k): v for k, v in state.ranks(run.job_id).items()},
        "rank0": run.summary,
        "versions": _versions(),
        "files": uploaded,
    }
    store.put(bucket, prefix + "metadata.json", json.dumps(meta, indent=2, default=str).encode())
    return f"s3://{bucket}/{prefix}"


def _f(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("gangway", "xgboost", "lightgbm", "torch", "pyarrow", "celery"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out
