"""The training child: ``python -m workers.runtime.child``.

Forked by the worker's zygote (``workers.runtime.zygote``, which calls ``serve``), or started warm
(imports done) as a standby; either way it waits for its payload on stdin. It fetches its
shards, reports ``fetched``, waits for ``go`` (the supervisor's Redis barrier),
runs the framework runner and reports ``done`` or ``error``.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

from workers.runtime.events import ABORT, GO, Emitter, protocol_stream

RUNNERS = {"xgboost": "workers.runtime.xgboost_runner", "lightgbm": "workers.runtime.lightgbm_runner",
           "pytorch": "workers.runtime.torch_runner"}
# Only XGBoost is imported ahead: it keeps the spine's submit-to-training latency low, while
# LightGBM (+40 MiB) and torch (+300 MiB) would bloat every idle child; their jobs pay ~0.3-2 s.
PREIMPORT = ("workers.runtime.xgboost_runner",)


def _preimport(settings, modules: tuple[str, ...] = PREIMPORT) -> None:
    """Pay for imports and the S3 client while waiting as a standby (or in the zygote), not when a job
    arrives."""
    import pyarrow  # noqa: F401  (warm the import)

    from workers.runtime.shards import warm_store
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    warm_store(settings)


def _enter_scratch(scratch: str | None, tmp: str | None) -> None:
    """Relative paths and temp files of training code land in the rank's folders, removed with them."""
    import tempfile
    if scratch:
        os.chdir(scratch)
    if tmp:
        os.environ["TMPDIR"] = tmp
        tempfile.tempdir = tmp


def main() -> int:
    from common.settings import Settings
    out = protocol_stream()
    _preimport(Settings.from_env())
    return serve(out)


def serve(out) -> int:
    """Read the payload from stdin, fetch, wait for ``go``, train; events go to ``out``. A spawned child
    calls this after its imports; a child forked by the zygote (``workers.runtime.zygote``) right away."""
    from common.datasets import join_cache_writers
    from common.settings import Settings
    settings = Settings.from_env()
    line = sys.stdin.readline()
    if not line.strip():
        return 0   # a standby child that was never used
    payload = json.loads(line)
    emitter = Emitter(out)
    try:
        _enter_scratch(payload.get("scratch"), payload.get("tmp"))
        runner = importlib.import_module(RUNNERS[payload["spec"]["framework"]])
        t0 = time.perf_counter()
        with emitter.alive("fetch"):   # bounded by the store's retries and timeouts, not the progress timeout
            prepared = runner.prepare(payload, settings)
        emitter.emit("fetched", seconds=time.perf_counter() - t0, **prepared.fetch_summary())
        answer, _, shared = sys.stdin.readline().strip().partition(" ")
        if answer != GO:
            emitter.emit("error", type="Aborted", message=f"supervisor said {answer or ABORT!r}", traceback="")
            return 3
        summary = runner.train(prepared, emitter, json.loads(shared or "{}"))
        emitter.emit("done", summary=summary)
        return 0
    except BaseException as exc:  # every failure must reach the caller with its traceback
        emitter.error(exc)
        return 1
    finally:
        emitter.close()
        join_cache_writers()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
