"""``get_context()`` inside a PyTorch ``train_func``: this rank's view of the gang."""
from __future__ import annotations

import os
import tempfile
import threading
from typing import Any
from collections.abc import Callable

_current: TrainingContext | None = None
_lock = threading.Lock()


def current() -> TrainingContext:
    if _current is None:
        raise RuntimeError("get_context() is only available inside a train_func run by PyTorchDistributor "
                           "on a gangway worker")
    return _current


def install(ctx: TrainingContext | None) -> None:
    global _current
    with _lock:
        _current = ctx


class MetricsReporter:
    def __init__(self, sink: Callable[[dict], None]) -> None:
        self._sink = sink

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Record metrics; rank 0's last values are the result's ``get_metrics()``."""
        if not isinstance(metrics, dict):
            raise TypeError(f"log_metrics expects a dict, got {type(metrics).__name__}")
        self._sink({str(k): _scalar(k, v) for k, v in metrics.items()})


class TrainingContext:
    """Ranks, rendezvous, hyper-params, datasets, local folders, metrics and checkpoints."""

    def __init__(self, *, rank: int, world_size: int, local_rank: int, local_world_size: int, node_rank: int,
                 master_addr: str, master_port: int, use_gpu: bool, hyper_params: dict,
                 dataset_map: dict, workdir: str, on_metrics: Callable[[dict], None],
                 on_checkpoint: Callable[[str, dict], str], latest_checkpoint: Callable[[], str | None]) -> None:
        self._rank, self._world, self._local_rank = rank, world_size, local_rank
        self._local_world, self._node_rank = local_world_size, node_rank
        self._addr, self._port, self._gpu = master_addr, master_port, use_gpu
        self._hp, self._datasets = hyper_params, dataset_map
        self._model_dir = os.path.join(workdir, "model")
        self._ckpt_dir = os.path.join(workdir, "checkpoint")
        os.makedirs(self._model_dir, exist_ok=True)
        os.makedirs(self._ckpt_dir, exist_ok=True)
        self._reporter = MetricsReporter(on_metrics)
        self._on_checkpoint = on_checkpoint
        self._latest = latest_checkpoint
        self._workdir = workdir

    def get_rank(self) -> int:
        return self._rank

    def get_world_size(self) -> int:
        return self._world

    def get_local_rank(self) -> int:
        return self._local_rank

    def get_local_world_size(self) -> int:
        return self._local_world

    def get_node_rank(self) -> int:
        return self._node_rank

    def get_master_addr(self) -> str:
        return self._addr

    def get_master_port(self) -> int:
        return self._port

    def get_default_backend(self) -> str:
        return "nccl" if self._gpu else "gloo"

    def get_hyper_params(self) -> dict:
        return dict(self._hp)

    def get_dataset_map(self) -> dict:
        return dict(self._datasets)

    def get_model_dir(self) -> str:
        """A local folder; rank 0's is uploaded to ``{artifact_stage_location}/model/{job_id}/``."""
        return self._model_dir

    def get_checkpoint_dir(self) -> str:
        return self._ckpt_dir

    def get_metrics_reporter(self) -> MetricsReporter:
        return self._reporter

    def report(self, metrics: dict[str, Any], checkpoint: bool = False) -> None:
        """Log ``metrics``; with ``checkpoint`` rank 0 uploads ``get_checkpoint_dir()`` as the newest checkpoint."""
        self._reporter.log_metrics(metrics)
        if checkpoint and self._rank == 0:
            self._on_checkpoint(self._ckpt_dir, metrics)

    def get_latest_checkpoint(self) -> str | None:
        """A local folder with the newest checkpoint of this job (from an earlier attempt), or None."""
        return self._latest()

    def scratch_dir(self) -> str:
        return tempfile.mkdtemp(dir=self._workdir)


def _scalar(name: Any, value: Any) -> Any:
    """A metric as JSON: numbers, bools, strings, lists and dicts of those, and one-element tensors or
    arrays (``.item()``); anything else is refused naming the metric, never turned into a string."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_scalar(name, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _scalar(f"{name}.{k}", v) for k, v in value.items()}
    item = getattr(value, "item", None)
    size = getattr(value, "numel", None) or getattr(value, "size", None)
    count = size() if callable(size) else size
    if callable(item) and count in (None, 1):
        return item()
    raise TypeError(f"metric {name!r} must be a number, a bool, a string (or a list or dict of them) or a "
                    f"one-element tensor, got {type(value).__module__}.{type(value).__qualname__}"
                    + (f" of {count} elements" if count not in (None, 1) else "")
                    + " (log a summary such as its mean, or .tolist())")
