"""PyTorch checkpoints in the store: a retry resumes only from a checkpoint that was written whole."""
from __future__ import annotations

import os

import pytest

from common.errors import StoreError
from common.settings import Settings
from common.store import MemoryStore
from workers.runtime.torch_runner import Checkpoints, Prepared


class FailingStore(MemoryStore):
    """The in-memory store, failing every write after the first ``good`` ones (an abort mid-upload)."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    def put(self, bucket: str, key: str, data: bytes) -> None:
        if self.good <= 0:
            raise StoreError(f"connection reset writing s3://{bucket}/{key}")
        self.good -= 1
        super().put(bucket, key, data)


class Events:
    def __init__(self) -> None:
        self.sent = []

    def emit(self, kind: str, **fields) -> None:
        self.sent.append((kind, fields))


def checkpoints(tmp_path, store) -> Checkpoints:
    payload = {"job_id": "J", "token": "7-ab", "attempt": 1, "workdir": str(tmp_path / "work"),
               "spec": {"train": {"artifact_stage_location": "s3://stage/runs"}}}
    os.makedirs(payload["workdir"], exist_ok=True)
    store.ensure_bucket("stage")
    return Checkpoints(Prepared(payload, Settings.from_env({}), None), Events(), store=store)


def folder(tmp_path, name: str, files: dict[str, bytes]) -> str:
    path = tmp_path / name
    path.mkdir()
    for rel, data in files.items():
        (path / rel).write_bytes(data)
    return str(path)


def test_a_checkpoint_cut_short_mid_upload_is_never_handed_to_the_retry(tmp_path):
    store = FailingStore(good=3)   # checkpoint 0: two files and its marker; checkpoint 1: one file of two
    ckpt = checkpoints(tmp_path, store)
    ckpt.upload(folder(tmp_path, "c0", {"model.pt": b"v0", "optim.pt": b"o0"}), {})
    with pytest.raises(StoreError):
        ckpt.upload(folder(tmp_path, "c1", {"model.pt": b"v1", "optim.pt": b"o1"}), {})
    restored = ckpt.latest()
    assert sorted(os.listdir(restored)) == ["model.pt", "optim.pt"]
    assert open(os.path.join(restored, "model.pt"), "rb").read() == b"v0"


def test_the_next_checkpoint_never_reuses_the_folder_of_one_cut_short(tmp_path):
    store = FailingStore(good=1)
    ckpt = checkpoints(tmp_path, store)
    with pytest.raises(StoreError):
        ckpt.upload(folder(tmp_path, "c0", {"a.pt": b"a0", "b.pt": b"b0"}), {})
    store.good = 10
    uri = ckpt.upload(folder(tmp_path, "c1", {"b.pt": b"b1"}), {})
    assert uri.endswith("/checkpoints/J/000001-7-ab/")
    assert sorted(os.listdir(ckpt.latest())) == ["b.pt"]


def test_a_checkpoint_of_an_attempt_that_did_not_record_it_is_never_handed_to_a_retry(tmp_path):
    store = MemoryStore()
    first = checkpoints(tmp_path / "a", store)
    first.upload(folder(tmp_path, "c0", {"model.pt": b"recorded"}), {})
    stale = checkpoints(tmp_path / "b", store)   # the same attempt's child, outliving it: its supervisor refused
    stale.upload(folder(tmp_path, "c1", {"model.pt": b"stale"}), {})
    assert sorted(k.split("/")[3] for k in store.list("stage", "runs/checkpoints/J/")) == \
        ["000000-7-ab", "000000-7-ab", "000001-7-ab", "000001-7-ab"]
    payload = {"job_id": "J", "token": "8-cd", "attempt": 2, "workdir": str(tmp_path / "retry"),
               "spec": {"train": {"artifact_stage_location": "s3://stage/runs"}},
               "checkpoints_recorded": ["000000-7-ab"]}
    os.makedirs(payload["workdir"])
    retry = Checkpoints(Prepared(payload, Settings.from_env({}), None), Events(), store=store)
    assert open(os.path.join(retry.latest(), "model.pt"), "rb").read() == b"recorded"
    uri = retry.upload(folder(tmp_path, "c2", {"model.pt": b"retry"}), {})
    assert uri.endswith("/000002-8-cd/")   # past every folder, recorded or not
    assert open(os.path.join(retry.latest(), "model.pt"), "rb").read() == b"retry"   # its own count
