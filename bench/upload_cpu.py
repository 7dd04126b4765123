#!/usr/bin/env python
"""Producer vs S3-server CPU seconds for one upload and for raw PUTs of the same bytes, twice, alternating.

    PYTHONPATH=. python bench/upload_cpu.py [files=3]

Writes ``files`` x 1M-row HIGGS-shaped parquet files, starts a bare weed mini, and prints per line: MB/s,
this process's CPU seconds (process_time) and the S3 server's (psutil) for each phase.
"""
import os, sys, time, subprocess, tempfile, shutil, resource
sys.path.insert(0, "bench")
from overhead import FEATURES, LABEL, make_data
import pyarrow as pa, pyarrow.parquet as pq, psutil
from common.settings import Settings
from common.store import S3Store
from producer import DataConnector
from workers.local import services
from out_of_core import raw_put_mb_s
home = tempfile.mkdtemp(prefix="up10prof-")
port = services.free_port()
base = Settings.from_env({}, home=home, s3_endpoint=f"http://127.0.0.1:{port}")
os.makedirs(home + "/s3")
s3 = subprocess.Popen(services.weed_command(port, home + "/s3"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                      env=services.weed_env(base.s3_access_key, base.s3_secret_key))
weed = psutil.Process(s3.pid)
def wcpu():
    t = 0
    for p in [weed, *weed.children(recursive=True)]:
        c = p.cpu_times(); t += c.user + c.system
    return t
try:
    paths = []
    for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        X, y = make_data(1_000_000, seed=1+i)
        t = pa.table({**{f: X[:, j] for j, f in enumerate(FEATURES)}, LABEL: y})
        paths.append(f"{home}/p{i}.parquet"); pq.write_table(t, paths[-1], row_group_size=65536); del t, X, y
    st = S3Store(base)
    for _ in range(300):
        try: st.ensure_bucket(base.data_bucket); break
        except Exception: time.sleep(0.2)
    for rep in range(2):
        s = base.replace(data_bucket=f"upl-{rep}")
        c0, w0, t0 = time.process_time(), wcpu(), time.perf_counter()
        w = DataConnector.from_parquet(paths).materialise(S3Store(s), s)
        dt = time.perf_counter() - t0
        print(f"upload: {w.uploaded_bytes/1e6/dt:.0f} MB/s in {dt:.1f}s; {w.uploaded_bytes/1e6:.0f} MB; our CPU {time.process_time()-c0:.1f}s weed CPU {wcpu()-w0:.1f}s  (internal {w.seconds:.1f}s)", flush=True)
        chunk = w.manifest.nbytes // len(w.manifest.chunks)
        c0, w0, t0 = time.process_time(), wcpu(), time.perf_counter()
        mb = raw_put_mb_s(base.replace(), w.manifest.nbytes, chunk)
        print(f"raw:    {mb:.0f} MB/s in {time.perf_counter()-t0:.1f}s; our CPU {time.process_time()-c0:.1f}s weed CPU {wcpu()-w0:.1f}s", flush=True)
finally:
    s3.terminate()
    try: s3.wait(10)
    except subprocess.TimeoutExpired: s3.kill(); s3.wait()
    shutil.rmtree(home, ignore_errors=True)
