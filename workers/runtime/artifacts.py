"""Rank 0's artifacts: the model, eval results and metadata, staged under its attempt's own prefix; the
coordinator publishes them to s3://<artifact-bucket>/model/<job_id>/ once the attempt has won
(``common/artifacts.py``)."""
from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
import weakref

from common import artifacts as staging
from common.settings import Settings
from common.store import ObjectStore, S3Store
from workers.runtime.shards import warm_store

_BUCKETS_MADE: weakref.WeakKeyDictionary[ObjectStore, set[str]] = weakref.WeakKeyDictionary()


def artifact_store(settings: Settings) -> S3Store:
    """The process's S3 client (shared with shard fetching; one costs ~0.1 s to build)."""
    return warm_store(settings)


def destination(settings: Settings, spec: dict, job_id: str) -> tuple[str, str]:
    """(bucket, prefix) of a job's published artifacts: ``{artifact_stage_location}/model/{job_id}/`` for
    PyTorch jobs that name one, else the artifact bucket."""
    return staging.final_location(spec, job_id, settings.artifact_bucket)


def upload_artifacts(settings: Settings, state, run, workdir: str, *, check=lambda: None,
                     store: ObjectStore | None = None) -> str:
    """Stage what rank 0's child left (the model folder for PyTorch), plus metadata.json, under this
    attempt's own prefix; returns the URI the coordinator publishes them to once the attempt has won.

    The upload is registered (``gw:staged``) before its first write, so the coordinator deletes it if the
    attempt does not win. ``check()`` runs before every object is written and raises once the attempt has
    ended, so an attempt that lost its lease stops at the next file; metadata.json, written last, names the
    attempt (``attempt`` and ``token``) whose files these are."""
    store = store or artifact_store(settings)
    spec = run.payload["spec"]
    final_bucket, final_prefix = destination(settings, spec, run.job_id)
    bucket, prefix = staging.staging_location(spec, run.job_id, run.token, settings.artifact_bucket)
    made = _BUCKETS_MADE.setdefault(store, set())
    if bucket not in made:   # once per store client, not one request per job
        store.ensure_bucket(bucket)
        made.add(bucket)
    staging.register(state.r, run.job_id, run.token, staging.Staged(bucket, prefix, final_bucket, final_prefix))
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
    store.put(bucket, prefix + staging.MARKER, json.dumps(meta, indent=2, default=str).encode())
    return f"s3://{final_bucket}/{final_prefix}"


def _f(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


@functools.cache
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("gangway", "xgboost", "lightgbm", "torch", "pyarrow", "celery"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out
