"""Streaming ingest against a real S3 server (weed mini): bounded producer memory, content addressing,
and no dataset left behind by an interrupted upload."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.manifest import MANIFEST_NAME
from common.settings import Settings
from tests.conftest import IN_CI, _missing_binaries, stop_process
from workers.local import services

pytestmark = pytest.mark.integration

FEATURES = 28
ROWS_PER_FILE = 300_000           # x 29 float32 columns = 34.8 MB per file in memory
FILES = 8                          # 278 MB in all


@pytest.fixture(scope="module")
def s3_settings():
    """A bare S3 server of this module's own (no Redis, no workers: a producer needs only the store)."""
    missing = _missing_binaries()
    if missing:
        pytest.fail(missing) if IN_CI else pytest.skip(missing)
    home = tempfile.mkdtemp(prefix="gangway-ingest-")
    port = services.free_port()
    settings = Settings.from_env({}, home=home, s3_endpoint=f"http://127.0.0.1:{port}", chunk_rows=65536)
    data = os.path.join(home, "s3")
    os.makedirs(data)
    proc = subprocess.Popen(services.weed_command(port, data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=services.weed_env(settings.s3_access_key, settings.s3_secret_key))
    try:
        from common.store import S3Store
        store = S3Store(settings)
        deadline = time.monotonic() + 60
        while True:
            try:
                store.ensure_bucket(settings.data_bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield settings
    finally:
        stop_process(proc)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def parquet_dir(s3_settings):
    """Random float32 data (incompressible: its size on disk is its size in memory), written file by file."""
    folder = os.path.join(s3_settings.home, "parquet")
    os.makedirs(folder)
    rng = np.random.default_rng(7)
    names = [f"f{i}" for i in range(FEATURES)] + ["label"]
    for i in range(FILES):
        cols = rng.standard_normal((len(names), ROWS_PER_FILE), dtype=np.float32)
        pq.write_table(pa.table(dict(zip(names, cols))), os.path.join(folder, f"part-{i:02d}.parquet"),
                       row_group_size=65536, compression="none")
    return folder


PRODUCER = """
import json, sys, time
from common.settings import Settings
from common.store import S3Store
from producer import DataConnector

def peak_rss():   # VmHWM, not ru_maxrss: that one keeps the forking parent's peak across exec
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

settings = Settings.from_env()
store = S3Store(settings)
idle = peak_rss()
t0 = time.perf_counter()
written = DataConnector.from_parquet(sys.argv[1]).materialise(store, settings)
print(json.dumps({"uri": written.uri, "rows": written.manifest.num_rows, "nbytes": written.manifest.nbytes,
                  "uploaded": written.uploaded_bytes, "seconds": time.perf_counter() - t0, "idle_rss": idle,
                  "peak_rss": peak_rss()}))
"""


def _produce(settings: Settings, source: str) -> dict:
    env = {**os.environ, **settings.as_env()}
    out = subprocess.run([sys.executable, "-c", PRODUCER, source], capture_output=True, text=True, env=env,
                         timeout=600, cwd=os.getcwd(), check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["stderr"] = out.stderr
    return result


def test_producer_memory_does_not_grow_with_the_dataset_and_a_resubmit_sends_nothing(s3_settings, parquet_dir):
    """One file, then eight: the producer's peak RSS stays put while the data grows 8x past it."""
    mib = 1024 ** 2
    settings = s3_settings.replace(chunk_rows=16384, fetch_threads=4)   # ~2 MB chunks, 4 in flight
    small = _produce(settings, os.path.join(parquet_dir, "part-00.parquet"))
    big = _produce(settings, os.path.join(parquet_dir, "part-*.parquet"))
    print(f"\nproducer peak RSS {small['peak_rss'] / mib:.0f} MiB for {small['nbytes'] / mib:.0f} MiB of data, "
          f"{big['peak_rss'] / mib:.0f} MiB for {big['nbytes'] / mib:.0f} MiB ({big['rows']:,} rows, "
          f"{big['seconds']:.1f} s; idle after imports {big['idle_rss'] / mib:.0f} MiB)")
    assert big["rows"] == FILES * ROWS_PER_FILE and big["nbytes"] > 7 * small["nbytes"]
    assert big["uploaded"] >= big["nbytes"] - small["nbytes"]   # part-00's chunks were stored already
    assert big["peak_rss"] - small["peak_rss"] < 48 * mib, (small, big)   # 232 MiB more data, same memory
    assert big["peak_rss"] < big["nbytes"], big   # the dataset never sat in the producer's memory
    assert big["peak_rss"] - big["idle_rss"] < big["nbytes"] / 2, big
    again = _produce(settings, os.path.join(parquet_dir, "part-*.parquet"))
    assert again["uri"] == big["uri"] and again["uploaded"] == 0


def test_an_interrupted_upload_leaves_no_manifest_and_the_retry_completes(s3_settings):
    from common.store import S3Store
    from producer import DataConnector
    store = S3Store(s3_settings)
    rng = np.random.default_rng(11)
    batches = [pa.record_batch({"x": rng.standard_normal(10_000), "y": rng.standard_normal(10_000)})
               for _ in range(20)]
    bucket = s3_settings.data_bucket
    before = {k for k in store.list(bucket, "datasets/") if k.endswith(MANIFEST_NAME)}

    def interrupted():
        yield from batches[:12]
        raise KeyboardInterrupt("the user pressed Ctrl-C midway")

    settings = s3_settings.replace(chunk_rows=25_000)
    with pytest.raises(KeyboardInterrupt):
        DataConnector.from_batches(interrupted()).materialise(store, settings)
    assert {k for k in store.list(bucket, "datasets/") if k.endswith(MANIFEST_NAME)} == before
    written = DataConnector.from_batches(iter(batches)).materialise(store, settings)
    assert written.manifest.num_rows == 200_000
    assert {k for k in store.list(bucket, "datasets/") if k.endswith(MANIFEST_NAME)} == \
        before | {written.uri.split(f"{bucket}/", 1)[1] + MANIFEST_NAME}
    again = DataConnector.from_batches(iter(batches)).materialise(store, settings)
    assert again.uri == written.uri and again.uploaded_bytes == 0


def test_parquet_under_an_s3_prefix_with_copy_streams_like_local_files(s3_settings, tmp_path):
    from common.store import S3Store
    from producer import DataConnector
    store = S3Store(s3_settings)
    store.ensure_bucket("raw-parquet")
    rng = np.random.default_rng(5)
    table = pa.table({"x": rng.standard_normal(30_000), "y": rng.standard_normal(30_000)})
    for i in range(3):
        local = tmp_path / f"part-{i}.parquet"
        pq.write_table(table.slice(i * 10_000, 10_000), local, row_group_size=4_000)
        store.put_file("raw-parquet", f"exports/day=1/part-{i}.parquet", str(local))
    store.put("raw-parquet", "exports/day=1/_SUCCESS", b"")
    settings = s3_settings.replace(chunk_rows=8_000)
    from_s3 = DataConnector.from_parquet("s3://raw-parquet/exports/day=1/", copy=True).materialise(store, settings)
    from_disk = DataConnector.from_parquet(str(tmp_path / "part-*.parquet")).materialise(store, settings)
    assert from_s3.manifest.num_rows == 30_000 and [c.rows for c in from_s3.manifest.chunks] == [8_000] * 3 + [6_000]
    assert from_s3.manifest.chunks == from_disk.manifest.chunks   # same rows, same chunks
    assert from_disk.uploaded_bytes < 2_000   # only its manifest: every chunk was pooled already


def test_parquet_under_an_s3_prefix_is_referenced_in_place_uploading_only_a_manifest(s3_settings, tmp_path):
    from common.datasets import ChunkCache, DatasetReader
    from common.store import S3Store
    from producer import DataConnector
    store = S3Store(s3_settings)
    store.ensure_bucket("raw-in-place")
    rng = np.random.default_rng(6)
    table = pa.table({"x": rng.standard_normal(30_000), "y": rng.standard_normal(30_000)})
    for i in range(3):
        local = tmp_path / f"part-{i}.parquet"
        pq.write_table(table.slice(i * 10_000, 10_000), local, row_group_size=4_000)
        store.put_file("raw-in-place", f"exports/part-{i}.parquet", str(local))
    bucket = s3_settings.data_bucket
    before = set(store.list(bucket, ""))
    written = DataConnector.from_parquet("s3://raw-in-place/exports/").materialise(store, s3_settings.replace(
        chunk_rows=8_000))
    assert set(store.list(bucket, "")) - before == {written.uri.split(f"{bucket}/", 1)[1] + MANIFEST_NAME}
    assert written.manifest.referenced and written.uploaded_bytes < 10_000
    assert [c.rows for c in written.manifest.chunks] == [8_000, 2_000] * 3   # row groups are never split
    reader = DatasetReader(store, ChunkCache(tmp_path / "cache", 1 << 30))
    halves = [reader.read(written.uri, world_size=2, rank=r) for r in (0, 1)]
    assert [h.num_rows for h in halves] == [15_000, 15_000] and pa.concat_tables(halves).equals(table)
    sizes = sum(o.size for o in store.list_info("raw-in-place", "exports/"))
    assert reader.stats.bytes_fetched < 1.02 * sizes   # each range once (the shared one from the cache), footers


def test_a_referenced_file_deleted_or_rewritten_fails_the_read_naming_it(s3_settings, tmp_path):
    from common.datasets import ChunkCache, DatasetReader
    from common.errors import ObjectChangedError
    from common.store import S3Store
    from producer import DataConnector
    store = S3Store(s3_settings)
    store.ensure_bucket("raw-changing")
    for i in range(2):
        pq.write_table(pa.table({"x": np.arange(i * 1000, (i + 1) * 1000)}), tmp_path / f"{i}.parquet")
        store.put_file("raw-changing", f"p/{i}.parquet", str(tmp_path / f"{i}.parquet"))
    written = DataConnector.from_parquet("s3://raw-changing/p/").materialise(store, s3_settings)
    store.put_file("raw-changing", "p/1.parquet", str(tmp_path / "0.parquet"))   # same size, other bytes
    reader = DatasetReader(store, ChunkCache(tmp_path / "cache", 1 << 30))
    with pytest.raises(ObjectChangedError, match=r"source file s3://raw-changing/p/1.parquet .* changed after the "
                                                 r"dataset was made .* had ETag '[0-9a-f]+' .* now '[0-9a-f]+'"):
        reader.read(written.uri)
    store.client.remove_object("raw-changing", "p/0.parquet")
    with pytest.raises(ObjectChangedError, match=r"s3://raw-changing/p/0.parquet at .* is gone"):
        DatasetReader(store, ChunkCache(tmp_path / "cache2", 1 << 30)).read(written.uri)


def test_a_buffer_put_signed_with_its_known_sha256_is_stored_byte_for_byte(s3_settings):
    """S3Store.put sends a bytearray/memoryview as it is and signs it with the caller's SHA-256 instead
    of hashing the body again (weed accepts any payload hash that is signed; MinIO would also check it)."""
    import hashlib

    from common import store as store_module
    from common.store import S3Store
    assert store_module._fast_put(), "minio's private single PUT changed: the fast path is off (see S3Store.put)"
    store, bucket = S3Store(s3_settings), s3_settings.data_bucket
    body = bytearray(os.urandom(3 << 20))
    store.put(bucket, "fast/bytearray", body, sha256=hashlib.sha256(body).hexdigest())
    store.put(bucket, "fast/view", memoryview(body)[1:], sha256=hashlib.sha256(body[1:]).hexdigest())
    store.put(bucket, "fast/unhashed", body)
    assert store.get(bucket, "fast/bytearray") == body
    assert store.get(bucket, "fast/view") == body[1:]
    assert store.get(bucket, "fast/unhashed") == body
    # the header that was signed is the caller's hash, with the body's length
    store_module._known_sha256.value = "ab" * 32
    try:
        headers, _ = store.client._build_headers("h", {}, memoryview(body), store.client._provider.retrieve())
    finally:
        store_module._known_sha256.value = None
    assert headers["x-amz-content-sha256"] == "ab" * 32 and headers["Content-Length"] == str(len(body))
    headers, _ = store.client._build_headers("h", {}, bytes(body), store.client._provider.retrieve())
    assert headers["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()
