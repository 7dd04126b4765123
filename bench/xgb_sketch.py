#!/usr/bin/env python
"""What XGBoost holds while it builds a matrix, against what the worker's memory plan counts for it.

    python bench/xgb_sketch.py [--shapes 33420x250,100000x250,300000x250,1000000x250,300000x50,300000x100]
                               [--chunk-rows 16384] [--mode ext|incore]

Each shape runs in a fresh process: an ``ExtMemQuantileDMatrix`` (or in-core ``QuantileDMatrix``)
built from a ``DataIter`` of dense float32 chunks, then 1 round of training. Measured: the peak of
anonymous memory (RssAnon, sampled every 20 ms) above the process's floor before the first chunk.
Planned: ``ShardSize.sketch_bytes`` plus the chunk window (``CHUNKS_IN_FLIGHT`` chunks), which
``workers/runtime/memory.py`` adds for XGBoost. The plan must not be below the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import log, print_table, row

from workers.runtime.memory import CHUNKS_IN_FLIGHT, MiB, ShardSize

CHILD = r"""
import json, os, sys, threading, time
import numpy as np, xgboost as xgb
rows, feats, chunk, mode, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) * 1024
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], anon()); time.sleep(0.02)
class Chunks(xgb.DataIter):
    def __init__(self, prefix):
        self.i, self.n = 0, (rows + chunk - 1) // chunk
        super().__init__(cache_prefix=prefix, release_data=True)
    def next(self, input_data):
        if self.i == self.n:
            return False
        r = min(chunk, rows - self.i * chunk)
        X = np.random.default_rng(self.i).standard_normal((r, feats), dtype=np.float32)
        input_data(data=X, label=(X[:, 0] + X[:, 1] > 0).astype(np.float32))
        self.i += 1
        return True
    def reset(self):
        self.i = 0
floor = anon()
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if mode == "ext":
    m = xgb.ExtMemQuantileDMatrix(Chunks(os.path.join(folder, "c")), max_bin=256, nthread=2)
else:
    m = xgb.QuantileDMatrix(Chunks(None), max_bin=256, nthread=2)
built = time.perf_counter() - t0
xgb.train({"objective": "binary:logistic", "max_depth": 6, "nthread": 2}, m, 1)
time.sleep(0.1)
print(json.dumps({"over": peak[0] - floor, "build_seconds": built, "xgboost": xgb.__version__}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="33420x250,100000x250,300000x250,1000000x250,300000x50,300000x100")
    p.add_argument("--chunk-rows", type=int, default=16384)
    p.add_argument("--mode", choices=("ext", "incore"), default="ext")
    a = p.parse_args()
    out, version = [], "?"
    for shape in a.shapes.split(","):
        rows, feats = (int(v) for v in shape.split("x"))
        log(f"{rows:,} rows x {feats} features")
        with tempfile.TemporaryDirectory(prefix="gangway-sketch-") as folder:
            res = subprocess.run([sys.executable, "-c", CHILD, str(rows), str(feats), str(a.chunk_rows), a.mode,
                                  folder], capture_output=True, text=True, check=True)
        m = json.loads(res.stdout.strip().splitlines()[-1])
        version = m["xgboost"]
        planned = ShardSize(0, rows, feats, 0).sketch_bytes + CHUNKS_IN_FLIGHT * a.chunk_rows * feats * 4
        out.append(row(f"{rows:,} x {feats}: anonymous peak above floor / planned (MiB)",
                       f"{m['over'] / MiB:.0f} / {planned / MiB:.0f} (build {m['build_seconds']:.1f} s)",
                       "measured <= planned", m["over"] <= planned))
    print_table(f"{'ExtMemQuantileDMatrix' if a.mode == 'ext' else 'QuantileDMatrix'} from dense float32 chunks of "
                f"{a.chunk_rows:,} rows, max_bin 256, 1 round; xgboost {version}; {os.cpu_count()} CPUs", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
