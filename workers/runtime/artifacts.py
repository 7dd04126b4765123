"""Rank 0's artifacts: the model, eval results and metadata under s3://<artifact-bucket>/model/<job_id>/."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

from common.settings import Settings
from common.store import ObjectStore, S3Store, parse_s3_uri
from workers.runtime.shards import warm_store

def artifact_prefix(job_id: str) -> str:
    return f"model/{job_id}/"


def artifact_store(settings: Settings) -> S3Store:
    """The process's S3 client (shared with shard fetching; one costs ~0.1 s to build)."""
    return warm_store(settings)


def destination(settings: Settings, spec: dict, job_id: str) -> tuple[str, str]:
    """(bucket, prefix) of a job's artifacts: ``{artifact_stage_location}/model/{job_id}/`` for PyTorch
    jobs that name one, else the artifact bucket."""
    stage = (spec.get("train") or {}).get("artifact_stage_location")
    if stage:
        bucket, base = parse_s3_uri(stage.rstrip("/") + "/")
        return bucket, f"{base}{artifact_prefix(job_id)}"
    return settings.artifact_bucket, artifact_prefix(job_id)


def upload_artifacts(settings: Settings, state, run, workdir: str, *, check=lambda: None,
                     store: ObjectStore | None = None) -> str:
    """Upload what rank 0's child left (the model folder for PyTorch), plus metadata.json; returns the URI.

    ``check()`` runs before every object is written and raises once the attempt has ended, so an
    attempt that lost its lease stops at the next file; metadata.json, written last, names the attempt
    (``attempt`` and ``token``) whose files these are."""
    store = store or artifact_store(settings)
    spec = run.payload["spec"]
    bucket, prefix = destination(settings, spec, run.job_id)
    store.ensure_bucket(bucket)
    source = os.path.join(workdir, "model") if spec["framework"] == "pytorch" else workdir
    uploaded = []
    for root, dirs, files in os.walk(source):
        if spec["framework"] != "pytorch":
            dirs.clear()   # GBDT runners write flat files; their scratch folders stay local
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, source)
            check()
            store.put_file(bucket, prefix + rel, path)
            uploaded.append(rel)
    job = state.job(run.job_id) or {}
    meta = {
        "job_id": run.job_id,
        "attempt": int(job.get("attempt") or 0),
        "token": run.token,
        "spec": json.loads(job.get("spec") or "{}"),
        "gang": json.loads(job.get("gang") or "{}"),
        "timings": {"submitted_at": _f(job.get("submitted_at")), "started_at": _f(job.get("started_at")),
                    "uploaded_at": time.time()},
        "ranks": {str(k): v for k, v in state.ranks(run.job_id).items()},
        "rank0": run.summary,
        "versions": _versions(),
        "files": uploaded,
    }
    check()
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
