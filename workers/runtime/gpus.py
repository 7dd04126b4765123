"""GPU discovery: NVML first, ``nvidia-smi`` second; one worker per GPU."""
from __future__ import annotations

import shutil
import subprocess


def detect_gpus() -> list[str]:
    """Indices of the GPUs on this host (empty without a driver)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (subprocess.SubprocessError, OSError):
            return []
    return []


def worker_gpus(setting: str, cuda_visible: str | None) -> tuple[str, ...]:
    """The GPUs one worker owns: ``GANGWAY_WORKER_GPUS`` ("none", "0", "0,1"), else the
    pinned ``CUDA_VISIBLE_DEVICES``, else the first detected GPU."""
    if setting.strip().lower() == "none":
        return ()
    if setting.strip():
        return tuple(x.strip() for x in setting.split(",") if x.strip())
    if cuda_visible is not None:
        return tuple(x.strip() for x in cuda_visible.split(",") if x.strip() and x.strip() != "-1")
    found = detect_gpus()
    return tuple(found[:1])


def gpu_gauges(gpus: tuple[str, ...]):
    """Utilisation and memory of this worker's GPUs, read through NVML at scrape time (none without it)."""
    from prometheus_client.core import GaugeMetricFamily
    if not gpus:
        return
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:   # no driver or no nvidia-ml-py: no GPU series, never a failed scrape
        return
    util = GaugeMetricFamily("gangway_gpu_utilization_ratio", "GPU busy fraction over the last sample period.",
                             labels=["gpu"])
    used = GaugeMetricFamily("gangway_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
    total = GaugeMetricFamily("gangway_gpu_memory_total_bytes", "GPU memory installed.", labels=["gpu"])
    try:
        for gpu in gpus:
            h = pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
            util.add_metric([gpu], pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            used.add_metric([gpu], float(mem.used))
            total.add_metric([gpu], float(mem.total))
    finally:
        pynvml.nvmlShutdown()
    yield from (util, used, total)
