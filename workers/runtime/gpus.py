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
