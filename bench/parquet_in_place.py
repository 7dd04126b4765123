"""Parquet already in the store: referenced in place against copied into chunks.

    python bench/parquet_in_place.py [--files 4] [--rows-per-file 300000]

Starts a bare S3 server (weed mini), puts FILES parquet files (28 float32 features + label, row
groups of 65,536 rows, uncompressed) under one prefix, then prints, for ``from_parquet(prefix)`` and
``from_parquet(prefix, copy=True)``: submit seconds, bytes written to the data bucket, and the seconds
of rank 0's shard of 2 read through an empty chunk cache (``DatasetReader.read``), best of 2.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.datasets import ChunkCache, DatasetReader
from common.settings import Settings
from common.store import S3Store
from producer import DataConnector
from workers.local import services


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rows-per-file", type=int, default=300_000)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="gangway-inplace-bench-")
    port = services.free_port()
    settings = Settings.from_env({}, home=home, s3_endpoint=f"http://127.0.0.1:{port}")
    os.makedirs(os.path.join(home, "s3"))
    proc = subprocess.Popen(services.weed_command(port, os.path.join(home, "s3")), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=services.weed_env(settings.s3_access_key,
                                                                            settings.s3_secret_key))
    try:
        store = S3Store(settings)
        deadline = time.monotonic() + 60
        while True:
            try:
                store.ensure_bucket("raw")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        rng = np.random.default_rng(1)
        names = [f"f{i}" for i in range(28)] + ["label"]
        for i in range(args.files):
            cols = rng.standard_normal((len(names), args.rows_per_file), dtype=np.float32)
            buf = io.BytesIO()
            pq.write_table(pa.table(dict(zip(names, cols))), buf, row_group_size=65536, compression="none")
            store.put("raw", f"data/part-{i:02d}.parquet", buf.getvalue())
        size = sum(o.size for o in store.list_info("raw", "data/"))
        print(f"{args.files} files, {size / 1e6:.0f} MB of parquet\n")
        print("| | submit s | written to the data bucket | rank 0 of 2 reads its shard (empty cache), s |\n|---|---|---|---|")
        for label, copy in (("in place", None), ("copy=True", True)):
            before = store.bytes_put
            t0 = time.perf_counter()
            written = DataConnector.from_parquet("s3://raw/data/", copy=copy).materialise(store, settings)
            submit = time.perf_counter() - t0
            put = store.bytes_put - before
            reads = []
            for k in range(2):
                cache = ChunkCache(os.path.join(home, f"cache-{label}-{k}"), 16 << 30)
                t0 = time.perf_counter()
                DatasetReader(store, cache, threads=settings.fetch_threads).read(written.uri, world_size=2, rank=0)
                reads.append(time.perf_counter() - t0)
            print(f"| {label} | {submit:.2f} | {put / 1e6:.3f} MB | {min(reads):.2f} |")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
