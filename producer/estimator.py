"""What the XGBoost and LightGBM estimators share: data preparation, validation, submission."""
from __future__ import annotations

import json

import tempfile
from dataclasses import dataclass
from typing import Any

from common.errors import ValidationError
from common.models import JobSpec, Resources
from producer.client import Client, new_job_id
from producer.connectors import DataConnector
from producer.jobs import TrainingJob
from producer.validation import check_columns, check_positive_int, check_table, manifest_types


@dataclass
class ScalingConfig:
    """num_workers=-1: every free worker (at least one); use_gpu=None: GPU when the gang can be all-GPU."""

    num_workers: int = -1
    num_cpu_per_worker: int = -1
    use_gpu: bool | None = None

    def __post_init__(self) -> None:
        n = self.num_workers
        if isinstance(n, bool) or not isinstance(n, int) or (n < 1 and n != -1):
            raise ValidationError(f"num_workers must be -1 (every free worker) or an integer >= 1, got {n!r}")
        c = self.num_cpu_per_worker
        if isinstance(c, bool) or not isinstance(c, int) or (c < 1 and c != -1):
            raise ValidationError(f"num_cpu_per_worker must be -1 (all) or an integer >= 1, got {c!r}")
        if self.use_gpu not in (None, True, False):
            raise ValidationError(f"use_gpu must be True, False or None, got {self.use_gpu!r}")

    def resources(self) -> Resources:
        return Resources(self.num_workers, self.use_gpu, self.num_cpu_per_worker)


def as_connector(data: Any, name: str) -> DataConnector:
    if data is None:
        raise ValidationError(f"{name} is required")
    try:
        return DataConnector.from_dataframe(data)
    except TypeError as exc:
        raise ValidationError(f"{name}: {exc}") from exc


@dataclass
class Prepared:
    datasets: dict[str, dict]
    input_cols: list[str]
    sample: Any   # a small pyarrow table of the training data, for checking params locally


def prepare_data(client: Client, dataset: Any, eval_set: Any, input_cols, label_col, weight_col,
                 world_hint: int, *, shard_eval: bool) -> Prepared:
    """Validate columns/types/labels, then materialise (content-addressed) train and eval sets."""
    conns = {"train": as_connector(dataset, "dataset")}
    if eval_set is not None:
        conns["eval"] = as_connector(eval_set, "eval_set")
    settings = client.settings
    features = None
    datasets: dict[str, dict] = {}
    sample = None
    for name, conn in conns.items():
        table = conn.to_arrow(settings) if conn._uri is None else None
        if table is not None:
            cols = table.column_names
        else:
            cols = conn.manifest(client.store, settings).columns
        cols_checked = check_columns(name, cols, input_cols if features is None else features, label_col, weight_col)
        features = features or cols_checked
        if table is not None:   # check before uploading anything
            check_table(name, table.num_rows, {f.name: f.type for f in table.schema}, table, features,
                        label_col, weight_col, world_hint)
        written = conn.materialise(client.store, settings)
        if table is None:
            check_table(name, written.manifest.num_rows, manifest_types(written.manifest), None, features,
                        label_col, weight_col, world_hint)
        if name == "train":
            sample = table.slice(0, 256) if table is not None else conn.to_arrow(settings, limit=256)
        datasets[name] = {"uri": written.uri, "sharded": True if name == "train" else shard_eval,
                          "rows": written.manifest.num_rows, "uploaded_bytes": written.uploaded_bytes}
    return Prepared(datasets, features, sample)


def submit_spec(client: Client, framework: str, resources: Resources, prepared: Prepared, params: dict,
                train_opts: dict, loader, priority: int = 0) -> TrainingJob:
    spec = JobSpec(job_id=new_job_id(), framework=framework, resources=resources, datasets=prepared.datasets,
                   params=params, train=train_opts, priority=priority)
    client.submit(spec)
    return TrainingJob(spec.job_id, settings=client.settings, loader=loader)


def download_artifacts(job: TrainingJob, names: tuple[str, ...]) -> dict[str, bytes]:
    settings = job.client.settings
    prefix = f"model/{job.job_id}/"
    return {n: job.client.store.get(settings.artifact_bucket, prefix + n) for n in names}


def check_common_args(verbose_eval, early_stopping_rounds, n_estimators) -> None:
    if verbose_eval is not None and (isinstance(verbose_eval, bool) or not isinstance(verbose_eval, int)
                                     or verbose_eval < 1):
        raise ValidationError(f"verbose_eval must be None or an integer >= 1, got {verbose_eval!r}")
    check_positive_int("early_stopping_rounds", early_stopping_rounds, allow_none=True)
    check_positive_int("n_estimators", n_estimators)
    if n_estimators > 1_000_000:
        raise ValidationError(f"n_estimators={n_estimators} is more than 1,000,000 rounds")


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="gangway-")


def load_json(data: bytes) -> Any:
    return json.loads(data.decode())


