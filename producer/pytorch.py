"""PyTorchDistributor: run a ``train_func`` on a gang of workers with torch.distributed set up.

``train_func`` and what it references travel as a cloudpickle blob in the data
bucket, never through the broker. Inside it, ``get_context()`` gives the rank's
view: ranks, rendezvous, hyper-params, datasets, the local model and checkpoint
folders, and a metrics reporter.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import types
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from common.errors import ValidationError
from common.models import Resources
from common.store import parse_s3_uri
from producer.client import Client
from producer.connectors import DataConnector, ShardedDataConnector
from producer.estimator import (
    Prepared,
    as_connector,
    check_max_failures,
    check_progress_timeout,
    say_uploads,
    submit_spec,
)
from producer.jobs import TrainingJob

__all__ = ["PyTorchDistributor", "PyTorchScalingConfig", "WorkerResourceConfig", "PyTorchDistributorResult",
           "get_context"]


@dataclass(frozen=True)
class WorkerResourceConfig:
    """What one rank needs: ``num_gpus`` > 0 reserves a GPU worker owning at least that many GPUs (its
    ``CUDA_VISIBLE_DEVICES`` is exactly those), ``num_cpus`` a worker with at least that many CPUs."""

    num_cpus: int = 1
    num_gpus: int = 0

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValidationError(f"WorkerResourceConfig.{name} must be an integer >= 0, got {v!r}")


@dataclass(frozen=True)
class PyTorchScalingConfig:
    num_nodes: int = 1
    num_workers_per_node: int = 1
    resource_requirements_per_worker: WorkerResourceConfig = field(default_factory=WorkerResourceConfig)

    def __post_init__(self) -> None:
        for name in ("num_nodes", "num_workers_per_node"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValidationError(f"PyTorchScalingConfig.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.resource_requirements_per_worker, WorkerResourceConfig):
            raise ValidationError("resource_requirements_per_worker must be a WorkerResourceConfig, got "
                                  f"{type(self.resource_requirements_per_worker).__name__}")

    def resources(self) -> Resources:
        req = self.resource_requirements_per_worker
        return Resources(num_workers=self.num_nodes * self.num_workers_per_node, use_gpu=req.num_gpus > 0,
                         num_cpu_per_worker=req.num_cpus if req.num_cpus > 0 else -1,
                         num_nodes=self.num_nodes, workers_per_node=self.num_workers_per_node,
                         gpus_per_worker=req.num_gpus)


@dataclass(frozen=True)
class PyTorchDistributorResult:
    model_dir: str
    metrics: dict
    checkpoint_location: str | None

    def get_model_dir(self) -> str:
        """The artifact URI holding rank 0's ``get_model_dir()`` folder."""
        return self.model_dir

    def get_metrics(self) -> dict:
        """What rank 0 reported through ``log_metrics`` / ``report``."""
        return self.metrics

    def get_checkpoint_location(self) -> str | None:
        return self.checkpoint_location


def pickle_function(func: Callable) -> bytes:
    """cloudpickle ``func`` by value, with the user's own modules it uses (files outside the installed
    packages and the standard library: the fleet does not have them); name the object that cannot be
    pickled when it fails."""
    import cloudpickle
    modules = user_modules(func)
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(func)
    except Exception as exc:
        culprit = _unpicklable_reference(func)
        raise ValidationError(f"train_func {getattr(func, '__qualname__', func)!r} cannot be pickled: "
                              f"{culprit or f'{type(exc).__name__}: {exc}'}") from exc
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)


def user_modules(func: Callable) -> list:
    """The not-installed modules ``func`` reaches through its module, globals and closure, following what
    is shipped by value (functions and classes of the script, of those modules): ``from mylib import
    Model`` next to the user's script, also when a helper of the script is what names it."""
    found: dict[str, types.ModuleType] = {}
    seen: set[int] = set()

    def consider(obj: Any) -> None:
        module = obj if isinstance(obj, types.ModuleType) else sys.modules.get(getattr(obj, "__module__", "") or "")
        if module is not None and _is_users_own(module):
            found.setdefault(module.__name__, module)
        by_value = module is not None and (module.__name__ == "__main__" or _is_users_own(module))
        if by_value and isinstance(obj, types.FunctionType) and id(obj) not in seen:
            seen.add(id(obj))
            follow(obj)

    def follow(f: types.FunctionType) -> None:
        g = f.__globals__
        for name in _code_names(f.__code__):
            if name in g:
                consider(g[name])
        for cell in f.__closure__ or ():
            try:
                consider(cell.cell_contents)
            except ValueError:   # an empty cell
                pass

    consider(func)
    if isinstance(func, types.FunctionType) and id(func) not in seen:
        seen.add(id(func))
        follow(func)
    return list(found.values())


def _code_names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _is_users_own(module) -> bool:
    """A module from a file outside site-packages and the standard library (not gangway itself)."""
    name = module.__name__
    if name in ("__main__", "builtins") or name.split(".")[0] in ("producer", "workers", "common"):
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return False
    installed = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    real = os.path.realpath(path)
    return not any(real.startswith(os.path.realpath(p) + os.sep) for p in installed if p) and \
        "site-packages" not in real.split(os.sep) and "dist-packages" not in real.split(os.sep)


def _unpicklable_reference(func: Callable) -> str:
    import cloudpickle
    code = getattr(func, "__code__", None)
    refs: dict[str, Any] = {}
    if code is not None:
        g = getattr(func, "__globals__", {})
        refs.update({f"global {n!r}": g[n] for n in code.co_names if n in g})
        cells = getattr(func, "__closure__", None) or ()
        refs.update({f"closure variable {n!r}": c.cell_contents for n, c in zip(code.co_freevars, cells)})
    for label, obj in refs.items():
        try:
            cloudpickle.dumps(obj)
        except Exception as exc:
            return f"{label} ({type(obj).__module__}.{type(obj).__qualname__}) cannot be pickled: {exc}"
    return ""


class PyTorchDistributor:
    """``PyTorchDistributor(train_func, scaling_config=None)``; ``run()`` blocks, ``submit()`` does not."""

    def __init__(self, train_func: Callable[[], Any], scaling_config: PyTorchScalingConfig | None = None) -> None:
        if not callable(train_func):
            raise ValidationError(f"train_func must be callable, got {type(train_func).__name__}")
        if scaling_config is not None and not isinstance(scaling_config, PyTorchScalingConfig):
            raise ValidationError(f"scaling_config must be a PyTorchScalingConfig, got "
                                  f"{type(scaling_config).__name__}")
        self.train_func = train_func
        self.scaling_config = scaling_config or PyTorchScalingConfig()
        self.last_job: TrainingJob | None = None
        self._datasets: dict[str, dict] = {}

    def run(self, *, dataset_map: dict[str, Any] | None = None, hyper_params: dict | None = None,
            artifact_stage_location: str | None = None, timeout: float | None = None,
            max_failures: int | None = None, progress_timeout: float | None = None) -> PyTorchDistributorResult:
        """Run ``train_func`` on the gang and wait; rank 0's model folder is uploaded when it returns.

        A rank is not judged by what it logs: by default a live training process is never called hung
        (``init_process_group(timeout=...)`` bounds a stuck collective); ``progress_timeout=S`` fails a rank
        that logs no metrics for S seconds."""
        job = self.submit(dataset_map=dataset_map, hyper_params=hyper_params,
                          artifact_stage_location=artifact_stage_location, max_failures=max_failures,
                          timeout=timeout, progress_timeout=progress_timeout)
        say_uploads(job.job_id, self._datasets)
        return job.wait(None if timeout is None else timeout + 30, echo=True, cancel_on_interrupt=True)

    def submit(self, *, dataset_map: dict[str, Any] | None = None, hyper_params: dict | None = None,
               artifact_stage_location: str | None = None, priority: int = 0,
               max_failures: int | None = None, timeout: float | None = None,
               progress_timeout: float | None = None) -> TrainingJob:
        check_progress_timeout(progress_timeout)
        client = Client.default()
        max_failures = check_max_failures(max_failures, client.settings)
        hyper_params = _check_hyper_params(hyper_params)
        stage = _check_stage(artifact_stage_location, client.settings.artifact_bucket)
        blob = pickle_function(self.train_func)
        resources = self.scaling_config.resources()
        client.check_capacity(resources)
        datasets = self._datasets = _materialise_map(client, dataset_map or {})
        func_key = f"functions/{hashlib.sha256(blob).hexdigest()}.pkl"
        client.store.ensure_bucket(client.settings.data_bucket)
        if not client.store.exists(client.settings.data_bucket, func_key):
            client.store.put(client.settings.data_bucket, func_key, blob)
        opts = {"func_uri": f"s3://{client.settings.data_bucket}/{func_key}", "hyper_params": hyper_params,
                "artifact_stage_location": stage, "func_name": getattr(self.train_func, "__qualname__", ""),
                "progress_timeout": progress_timeout}
        prepared = Prepared(datasets=datasets, input_cols=[], sample=None)
        self.last_job = submit_spec(client, "pytorch", resources, prepared, {}, opts, load_result, priority,
                                    max_failures, timeout)
        return self.last_job


def _check_hyper_params(hp: Any) -> dict:
    import json
    if hp is None:
        return {}
    if not isinstance(hp, dict):
        raise ValidationError(f"hyper_params must be a dict, got {type(hp).__name__}")
    try:
        json.dumps(hp)
    except TypeError as exc:
        raise ValidationError(f"hyper_params must be JSON-serialisable (they travel in the job spec): {exc}") from exc
    return hp


def _check_stage(location: str | None, default_bucket: str) -> str:
    if location is None:
        return f"s3://{default_bucket}"
    try:
        bucket, prefix = parse_s3_uri(location)
    except ValueError as exc:
        raise ValidationError(f"artifact_stage_location: {exc}") from exc
    return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")


def _materialise_map(client: Client, dataset_map: dict) -> dict[str, dict]:
    if not isinstance(dataset_map, dict):
        raise ValidationError(f"dataset_map must be a dict of name -> DataConnector, got {type(dataset_map).__name__}")
    out = {}
    for name, conn in dataset_map.items():
        if not isinstance(name, str) or not name:
            raise ValidationError(f"dataset_map keys must be non-empty strings, got {name!r}")
        conn = conn if isinstance(conn, DataConnector) else as_connector(conn, f"dataset_map[{name!r}]")
        written = conn.materialise(client.store, client.settings)
        if written.manifest.num_rows == 0:
            raise ValidationError(f"dataset {name!r} is empty (0 rows)")
        out[name] = {"uri": written.uri, "sharded": isinstance(conn, ShardedDataConnector),
                     "equal": bool(getattr(conn, "equal", False)), "rows": written.manifest.num_rows,
                     "uploaded_bytes": written.uploaded_bytes}
    return out


def load_result(job: TrainingJob) -> PyTorchDistributorResult:
    import json
    rec = job.record()
    summary = json.loads(rec.get("rank0_summary") or "{}")
    return PyTorchDistributorResult(model_dir=summary.get("artifacts", ""), metrics=summary.get("metrics", {}),
                                    checkpoint_location=summary.get("checkpoint_location"))


def get_context():
    """The running rank's context; only inside a ``train_func`` run by gangway."""
    from workers.runtime.torch_context import current
    return current()
