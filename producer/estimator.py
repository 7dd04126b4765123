"""What the XGBoost and LightGBM estimators share: data preparation, validation, submission."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.arrays import float32_matrix as feature_matrix  # noqa: F401  (re-exported to the estimators)
from common.errors import ValidationError
from common.models import JobSpec, Resources
from common.signing import sign
from producer.categoricals import (
    Declaration,
    categorical_columns,
    encode_sample,
    encoded_columns,
    frame_matrix,
)
from producer.client import Client, new_job_id
from producer.connectors import DataConnector
from producer.jobs import TrainingJob
from producer.validation import (
    LabelCounter,
    check_columns,
    check_labels,
    check_positive_int,
    check_rows,
    check_types,
    count_bad_labels,
    manifest_types,
)


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
    sample: Any   # a small pyarrow table of the training data (categoricals as codes), for checking params locally
    categorical: list[str] = field(default_factory=list)    # categorical features, in input order
    categories: dict[str, list] = field(default_factory=dict)   # the training set's mapping (column -> categories)


SAMPLE_ROWS = 256


def _stored_categories(conn: DataConnector, client: Client, schema) -> dict[str, list]:
    return conn.manifest(client.store, client.settings).categories if schema is None else {}


def _encode_plan(name: str, conn: DataConnector, types: dict, cats: list[str], stored: dict[str, list],
                 schema) -> list[str]:
    """The categorical columns to encode at upload; a stored dataset cannot be encoded any more."""
    encode = [c for c in encoded_columns(types, cats) if c not in stored]
    if encode and schema is None:
        raise ValidationError(f"categorical columns {encode} of dataset {name!r} ({conn!r}) are stored as "
                              f"{[str(types[c]) for c in encode]}, not as categories: categorical columns are "
                              "encoded when uploaded, so fit with the data itself (e.g. DataConnector.from_pandas(df))")
    return encode


def prepare_data(client: Client, dataset: Any, eval_set: Any, input_cols, label_col, weight_col,
                 world_hint: int, *, shard_eval: bool, declared: Declaration | None = None) -> Prepared:
    """Validate columns/types/labels, then materialise (content-addressed, streamed) train and eval sets.

    Only schemas and first rows are read before the upload, so every check that can fail early
    does, and a bad eval set uploads nothing; labels of a streamed source are checked chunk by
    chunk during its upload, and row counts from its manifest. Categorical columns (``declared``;
    None: the framework has none) are stored as codes of the training set's mapping, which the
    eval set shares."""
    conns = {"train": as_connector(dataset, "dataset")}
    if eval_set is not None:
        conns["eval"] = as_connector(eval_set, "eval_set")
    settings = client.settings
    features: list[str] | None = None
    samples, encode, stored = {}, {}, {}
    cats: list[str] = []
    for name, conn in conns.items():
        schema = conn.schema(settings)
        cols = schema.names if schema is not None else conn.manifest(client.store, settings).columns
        features = features or check_columns(name, cols, input_cols, label_col, weight_col)
        check_columns(name, cols, features, label_col, weight_col)
        types = ({f.name: f.type for f in schema} if schema is not None
                 else manifest_types(conn.manifest(client.store, settings)))
        stored[name] = _stored_categories(conn, client, schema)
        cats = _categoricals(name, types, features, declared, cats, stored[name])
        check_types(name, types, features, label_col, weight_col, cats, declared.how if declared else None)
        encode[name] = _encode_plan(name, conn, types, cats, stored[name], schema)
        if name == "train" or schema is not None:   # a stored eval set is not fetched here
            samples[name] = conn.to_arrow(settings, limit=SAMPLE_ROWS)
        if schema is not None:   # an in-memory table is checked whole; a stream's first rows now, the rest on the way up
            whole = conn._table if conn._table is not None else samples[name]
            check_labels(name, label_col, count_bad_labels(whole.column(label_col)))
    datasets: dict[str, dict] = {}
    mapping: dict[str, list] = {}
    for name, conn in conns.items():
        labels = LabelCounter(label_col)
        seed = None if name == "train" else _eval_seed(name, encode[name], mapping)
        written = conn.materialise(client.store, settings, inspect=labels, inspect_footer=labels.footer,
                                   categorical=encode[name], categories=seed)
        if name == "train":
            mapping = dict(written.manifest.categories)
        else:
            _check_same_mapping(name, written.manifest.categories, mapping)
        check_rows(name, written.manifest.num_rows, world_hint if name == "train" or shard_eval else 1)
        check_labels(name, label_col, labels.bad, labels.bad_row_groups)
        datasets[name] = {"uri": written.uri, "sharded": True if name == "train" else shard_eval,
                          "rows": written.manifest.num_rows, "uploaded_bytes": written.uploaded_bytes}
    sample = encode_sample(samples["train"], cats, mapping)
    return Prepared(datasets, features, sample, cats, mapping)


def _categoricals(name: str, types: dict, features: list[str], declared: Declaration | None,
                  train_cats: list[str] | None, stored: dict[str, list]) -> list[str]:
    """The categorical features of dataset ``name``; an eval set must have the training set's."""
    if declared is None:
        return []
    if train_cats is not None and name != "train":
        declared = Declaration(tuple(train_cats), declared.dictionaries)
    mine = categorical_columns(name, types, features, declared, stored)
    if train_cats is not None and name != "train" and mine != train_cats:
        raise ValidationError(f"dataset {name!r} has categorical columns {mine}, but 'train' has {train_cats}")
    return mine


def _eval_seed(name: str, encode: list[str], mapping: dict[str, list]) -> dict[str, list]:
    """The training set's mapping for the eval set's columns to encode (frozen: unseen is missing)."""
    lacking = sorted(c for c in encode if c not in mapping)
    if lacking:
        raise ValidationError(f"categorical columns {lacking} of dataset {name!r} hold strings, but the training "
                              "set stores them as numbers")
    return {c: mapping[c] for c in encode}


def _check_same_mapping(name: str, theirs: dict[str, list], ours: dict[str, list]) -> None:
    differ = sorted(c for c in theirs if theirs[c] != ours.get(c))
    if differ:
        raise ValidationError(f"dataset {name!r} maps categorical columns {differ} to other codes than the "
                              "training set (a stored eval set must have been uploaded with this training set)")


def check_categorical_cols(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int)) or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in value):
        raise ValidationError(f"categorical_cols must be a list of column names, got {value!r}")
    return list(value)


def check_max_failures(value: int | None, settings) -> int:
    if value is None:
        return settings.max_failures
    check_positive_int("max_failures", value, minimum=0)
    return value


def check_progress_timeout(value: float | None) -> float | None:
    """None (the fleet's default), 0 (never call a rank hung) or seconds > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValidationError(f"progress_timeout must be None, 0 (never) or seconds > 0, got {value!r}")
    return float(value)


def check_timeout(value: float | None) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValidationError(f"timeout must be a number of seconds > 0, got {value!r}")
    return float(value)


def submit_spec(client: Client, framework: str, resources: Resources, prepared: Prepared, params: dict,
                train_opts: dict, loader, priority: int = 0, max_failures: int | None = None,
                timeout: float | None = None) -> TrainingJob:
    spec = JobSpec(job_id=new_job_id(), framework=framework, resources=resources, datasets=prepared.datasets,
                   params=params, train=train_opts, priority=priority,
                   max_failures=check_max_failures(max_failures, client.settings), timeout=check_timeout(timeout))
    if client.settings.secret:
        spec.submitted_at = time.time()
        spec.signature = sign(client.settings.secret, json.loads(spec.to_json()))
    client.submit(spec)
    return TrainingJob(spec.job_id, settings=client.settings, loader=loader, submitted=True)


def download_artifacts(job: TrainingJob, names: tuple[str, ...]) -> dict[str, bytes]:
    settings = job.client.settings
    prefix = f"model/{job.job_id}/"
    return {n: job.client.store.get(settings.artifact_bucket, prefix + n) for n in names}


def check_verbose_eval(verbose_eval) -> int | None:
    """As in ``xgb.train``: ``True`` prints every round, ``N`` every N rounds, ``False``/``0``/``None`` never."""
    if verbose_eval is None or verbose_eval is False:
        return None
    if verbose_eval is True:
        return 1
    if not isinstance(verbose_eval, int) or verbose_eval < 0:
        raise ValidationError(f"verbose_eval must be a bool or an integer >= 0 (print every N rounds), "
                              f"got {verbose_eval!r}")
    return verbose_eval or None


def check_common_args(verbose_eval, early_stopping_rounds, n_estimators) -> None:
    check_verbose_eval(verbose_eval)
    check_positive_int("early_stopping_rounds", early_stopping_rounds, allow_none=True)
    check_positive_int("n_estimators", n_estimators)
    if n_estimators > 1_000_000:
        raise ValidationError(f"n_estimators={n_estimators} is more than 1,000,000 rounds")


def say_uploads(job_id: str, datasets: dict[str, dict]) -> None:
    """One line at the caller per dataset: what was sent, or that the store already had it."""
    for name, d in datasets.items():
        sent = d.get("uploaded_bytes", 0)
        size = f"{sent / 1e6:,.1f} MB" if sent >= 1e6 else f"{sent / 1e3:,.1f} kB"
        what = f"{size} uploaded" if sent else "already in the store, 0 bytes uploaded"
        print(f"gangway: job {job_id} dataset {name!r}: {d.get('rows', 0):,} rows, {what}", file=sys.stderr)


def job_features(job: TrainingJob) -> tuple[list[str] | None, dict[str, list]]:
    """A finished job's input columns and its training set's category mapping (from its manifest)."""
    spec = json.loads(job.record().get("spec") or "{}")
    opts, train = spec.get("train", {}), spec.get("datasets", {}).get("train", {})
    categories = {}
    if opts.get("categorical_cols") and train.get("uri"):
        from common.datasets import read_manifest
        categories = read_manifest(job.client.store, train["uri"]).categories
    return opts.get("input_cols"), categories


def load_json(data: bytes) -> Any:
    return json.loads(data.decode())




class BoostingEstimator:
    """``fit``/``submit``/``get_booster``/``get_eval_results``/``predict`` shared by the GBDT estimators.

    Subclasses name the framework, the rounds parameter aliases, how the eval set is
    split across ranks, and how params are checked locally and the model loaded."""

    framework: ClassVar[str]
    config_type: ClassVar[type]
    rounds_aliases: ClassVar[tuple[str, ...]] = ("n_estimators", "num_boost_round")
    thread_param: ClassVar[str] = "nthread"
    shard_eval: ClassVar[bool] = True
    model_file: ClassVar[str]

    def __init__(self, n_estimators: int, objective: str, params: dict[str, Any] | None,
                 scaling_config: ScalingConfig | None, callbacks: list | None) -> None:
        name = type(self).__name__
        if params is not None and not isinstance(params, dict):
            raise ValidationError(f"params must be a dict, got {type(params).__name__}")
        if scaling_config is not None and not isinstance(scaling_config, ScalingConfig):
            raise ValidationError(f"scaling_config must be a {self.config_type.__name__}, "
                                  f"got {type(scaling_config).__name__}")
        if callbacks:
            raise ValidationError(f"{name}(callbacks=...) is not supported yet: training runs on the fleet and "
                                  "callbacks cannot travel there; use verbose_eval and early_stopping_rounds")
        self.params = {"objective": objective, **(params or {})}
        rounds = n_estimators
        for alias in self.rounds_aliases:   # params win over the named argument
            if alias in self.params:
                rounds = self.params.pop(alias)
        check_positive_int("n_estimators", rounds)
        self.n_estimators = rounds
        self.scaling_config = scaling_config or self.config_type()
        self._booster = None
        self._eval_results: dict = {}
        self._input_cols: list[str] | None = None
        self._categories: dict[str, list] = {}   # the training set's category mapping, for predict
        self._datasets: dict[str, dict] = {}
        self.last_job: TrainingJob | None = None

    def fit(self, dataset, input_cols=None, label_col=None, eval_set=None, verbose_eval=None, *,
            weight_col=None, early_stopping_rounds=None, timeout: float | None = None,
            max_failures: int | None = None, progress_timeout: float | None = None, categorical_cols=None):
        """Train on the fleet; prints rank 0's eval every ``verbose_eval`` rounds; returns the Booster.

        ``max_failures``: retries after infrastructure failures (default ``GANGWAY_MAX_FAILURES``);
        ``progress_timeout``: seconds without a finished round after which a rank counts as hung (default
        ``GANGWAY_PROGRESS_TIMEOUT``; 0 = never); ``categorical_cols``: feature columns to train as
        categorical (strings, pandas categories, integer codes; see ``producer.categoricals``)."""
        job = self.submit(dataset, input_cols, label_col, eval_set, verbose_eval, weight_col=weight_col,
                          early_stopping_rounds=early_stopping_rounds, max_failures=max_failures, timeout=timeout,
                          progress_timeout=progress_timeout, categorical_cols=categorical_cols)
        say_uploads(job.job_id, self._datasets)
        return job.wait(None if timeout is None else timeout + 30, echo=check_verbose_eval(verbose_eval) is not None,
                        cancel_on_interrupt=True)

    def submit(self, dataset, input_cols=None, label_col=None, eval_set=None, verbose_eval=None, *,
               weight_col=None, early_stopping_rounds=None, priority: int = 0,
               max_failures: int | None = None, timeout: float | None = None,
               progress_timeout: float | None = None, categorical_cols=None) -> TrainingJob:
        """Validate, upload what the store lacks, enqueue; returns at once."""
        check_progress_timeout(progress_timeout)
        check_common_args(verbose_eval, early_stopping_rounds, self.n_estimators)
        if max_failures is not None:
            check_positive_int("max_failures", max_failures, minimum=0)
        check_timeout(timeout)
        if early_stopping_rounds and eval_set is None:
            raise ValidationError("early_stopping_rounds needs an eval_set")
        self._before_submit()
        client = Client.default()
        resources = self.scaling_config.resources()
        world = client.check_capacity(resources)
        params = dict(self.params)
        declared = self._declaration(params, check_categorical_cols(categorical_cols))
        prepared = prepare_data(client, dataset, eval_set, input_cols, label_col, weight_col, world,
                                shard_eval=self.shard_eval, declared=declared)
        if self.scaling_config.num_cpu_per_worker > 0:
            params.setdefault(self.thread_param, self.scaling_config.num_cpu_per_worker)
        self._check_params(params, prepared, label_col)
        opts = {"num_boost_round": self.n_estimators, "input_cols": prepared.input_cols, "label_col": label_col,
                "weight_col": weight_col, "verbose_eval": check_verbose_eval(verbose_eval),
                "early_stopping_rounds": early_stopping_rounds, "progress_timeout": progress_timeout,
                "categorical_cols": prepared.categorical}
        self._input_cols = prepared.input_cols
        self._categories = prepared.categories
        self._datasets = prepared.datasets
        self.last_job = submit_spec(client, self.framework, resources, prepared, params, opts, self._load, priority,
                                    max_failures, timeout)
        return self.last_job

    def _before_submit(self) -> None:
        """A hook for framework notices (LightGBM's CPU-only distributed learner)."""

    def _declaration(self, params: dict, categorical_cols: list) -> Declaration:
        """Which columns the user declared categorical (may take framework keys out of ``params``)."""
        raise NotImplementedError

    def _check_params(self, params: dict, prepared: Prepared, label_col: str) -> None:
        raise NotImplementedError

    def _load_model(self, data: bytes):
        raise NotImplementedError

    def _load(self, job: TrainingJob):
        files = download_artifacts(job, (self.model_file, "eval_results.json"))
        self._booster = self._load_model(files[self.model_file])
        self._eval_results = load_json(files["eval_results.json"])
        if self._input_cols is None:   # reattached by id: what predict needs comes from the job's spec
            self._input_cols, self._categories = job_features(job)
        return self._booster

    def get_booster(self):
        if self._booster is None:
            raise RuntimeError("no trained booster yet: call fit() (or wait() on a submitted job) first")
        return self._booster

    def get_eval_results(self) -> dict:
        """``{"train": {metric: [...]}, "eval": {...}}`` of the last fit."""
        self.get_booster()
        return self._eval_results

    def _feature_names(self) -> list[str] | None:
        return self._input_cols

    def _predict_matrix(self, X):
        raise NotImplementedError

    def predict(self, data):
        """Predict locally with the trained booster (pandas, Arrow, numpy or a DataConnector)."""
        import numpy as np
        self.get_booster()
        names = self._feature_names()
        if isinstance(data, DataConnector):
            data = data.to_arrow()
        if hasattr(data, "column_names"):   # pyarrow
            data = data.to_pandas()
        if hasattr(data, "columns") and names:
            missing = [c for c in names if c not in data.columns]
            if missing:
                raise ValidationError(f"predict: missing input columns {missing} (has: {list(data.columns)})")
            data = frame_matrix(data, names, self._categories)
        return self._predict_matrix(np.asarray(data, dtype=np.float32))
