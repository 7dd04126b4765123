"""Import + client creation cost of the S3 SDK, each in a fresh interpreter: boto3 against minio.

    python bench/store_client.py [--runs 7]

Prints wall seconds (median, best) and the RSS the import and client add over a bare interpreter
(VmRSS after minus before, median). Every training child pays this once. No server is contacted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, time
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) * 1024
before = rss()
t0 = time.perf_counter()
if {sdk!r} == "boto3":
    import boto3
    from botocore.config import Config
    boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1", aws_access_key_id="a",
                 aws_secret_access_key="b", config=Config(s3={{"addressing_style": "path"}}))
else:
    import urllib3
    from minio import Minio
    Minio("127.0.0.1:9", access_key="a", secret_key="b", secure=False, region="us-east-1",
          http_client=urllib3.PoolManager(maxsize=32))
print(json.dumps({{"seconds": time.perf_counter() - t0, "rss": rss() - before}}))
"""


def measure(sdk: str, runs: int) -> dict:
    samples = [json.loads(subprocess.run([sys.executable, "-c", PROBE.format(sdk=sdk)], capture_output=True,
                                         text=True, check=True).stdout) for _ in range(runs)]
    secs = [s["seconds"] for s in samples]
    return {"median_s": statistics.median(secs), "best_s": min(secs),
            "rss_mib": statistics.median(s["rss"] for s in samples) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    runs = ap.parse_args().runs
    print("| SDK | import + client, median (best) | RSS added, median |\n|---|---|---|")
    for sdk in ("boto3", "minio"):
        m = measure(sdk, runs)
        print(f"| {sdk} | {m['median_s']:.3f} s ({m['best_s']:.3f} s) | {m['rss_mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
