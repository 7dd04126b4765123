"""Checks of user input at the caller, before anything is queued."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from common.errors import ValidationError
from common.manifest import Manifest
from producer.categoricals import string_hint


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) \
        or pa.types.is_decimal(t) or pa.types.is_null(t)


def check_columns(name: str, columns: Sequence[str], input_cols: Sequence[str] | None, label_col: str | None,
                  weight_col: str | None = None) -> list[str]:
    """Resolve feature columns (default: every column but label/weight) and check presence."""
    if label_col is None:
        raise ValidationError("label_col is required (the column to predict)")
    if not isinstance(label_col, str):
        raise ValidationError(f"label_col must be a column name (str), got {type(label_col).__name__}")
    if input_cols is None:
        input_cols = [c for c in columns if c not in (label_col, weight_col)]
    elif isinstance(input_cols, str) or not all(isinstance(c, str) for c in input_cols):
        raise ValidationError(f"input_cols must be a list of column names, got {input_cols!r}")
    input_cols = list(input_cols)
    if not input_cols:
        raise ValidationError(f"no input columns for dataset {name!r} (has: {list(columns)})")
    dupes = sorted({c for c in input_cols if input_cols.count(c) > 1})
    if dupes:
        raise ValidationError(f"input_cols lists {dupes} more than once")
    wanted = input_cols + [label_col] + ([weight_col] if weight_col else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        what = "input columns" if set(missing) <= set(input_cols) else "columns"
        raise ValidationError(f"missing {what} {missing} in dataset {name!r} (has: {list(columns)})")
    if label_col in input_cols:
        raise ValidationError(f"label_col {label_col!r} is also listed in input_cols")
    return input_cols


def check_table(name: str, num_rows: int, types: dict[str, pa.DataType | None], table: pa.Table | None,
                input_cols: list[str], label_col: str, weight_col: str | None, world_size: int = 1) -> None:
    """Rows, types and label sanity of one dataset (labels only when the table is at hand)."""
    check_rows(name, num_rows, world_size)
    check_types(name, types, input_cols, label_col, weight_col)
    if table is not None:
        check_labels(name, label_col, count_bad_labels(table.column(label_col)))


def check_rows(name: str, num_rows: int, world_size: int = 1) -> None:
    if num_rows == 0:
        raise ValidationError(f"dataset {name!r} is empty (0 rows)")
    if num_rows < world_size:
        raise ValidationError(f"dataset {name!r} has {num_rows} rows, fewer than the {world_size} workers "
                              "of the gang")


def check_types(name: str, types: dict[str, pa.DataType | None], input_cols: list[str], label_col: str,
                weight_col: str | None, categorical: Sequence[str] = (), how: str | None = None) -> None:
    """Every column is a number, but the ``categorical`` features; ``how`` says how to declare a string
    column categorical (frameworks that train on categoricals)."""
    bad = {c: str(types[c]) for c in input_cols + [label_col] + ([weight_col] if weight_col else [])
           if types.get(c) is not None and not _is_numeric(types[c]) and c not in categorical}
    if bad:
        text = [c for c in bad if c in input_cols and (pa.types.is_string(types[c]) or
                                                       pa.types.is_large_string(types[c]))]
        if how and text:
            hint = string_hint(how, text)
        else:
            hint = "encode them as numbers before training"
        raise ValidationError(f"non-numeric columns in dataset {name!r}: {bad} ({hint})")


def count_bad_labels(label: pa.Array | pa.ChunkedArray) -> int:
    """Missing, NaN or infinite labels."""
    n_bad = label.null_count
    if pa.types.is_floating(label.type) and len(label):
        n_bad += len(label) - label.null_count - (pc.sum(pc.is_finite(label)).as_py() or 0)
    return n_bad


def check_labels(name: str, label_col: str, n_bad: int, where: Sequence[str] = ()) -> None:
    """``where``: the parquet row groups whose statistics show bad labels (data used in place)."""
    if where:
        more = f" and {len(where) - 5} more row groups" if len(where) > 5 else ""
        raise ValidationError(f"label column {label_col!r} of dataset {name!r} has missing or inf values: "
                              f"{'; '.join(where[:5])}{more}")
    if n_bad:
        raise ValidationError(f"label column {label_col!r} of dataset {name!r} has {n_bad} missing, NaN or "
                              "inf values")


class LabelCounter:
    """Counts bad labels chunk by chunk while a stream is uploaded (``materialise(inspect=...)``), and
    of parquet used in place, from every row group's statistics (``materialise(inspect_footer=...)``):
    nulls from ``null_count``, inf from min/max; no data is read. NaN is not in parquet statistics
    (writers leave it out of min/max), so in place it is caught at submit only in the first rows checked,
    and past them by the rank that reads it (``common.arrays.finite_labels``: the job fails naming it)."""

    def __init__(self, label_col: str) -> None:
        self.label_col, self.bad = label_col, 0
        self.bad_row_groups: list[str] = []      # "<what> in row group <g> of <uri>"
        self.unchecked_row_groups = 0            # no statistics for the label column

    def __call__(self, batch: pa.RecordBatch) -> None:
        self.bad += count_bad_labels(batch.column(batch.schema.get_field_index(self.label_col)))

    def footer(self, uri: str, meta) -> None:
        """Check the label column of every row group of one parquet file from its metadata."""
        col = _leaf_index(meta, self.label_col)
        if col is None:
            return   # a file without the column: its labels are null (the unified schema fills them)
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            stats = rg.column(col).statistics
            if stats is None or not stats.has_null_count:
                self.unchecked_row_groups += 1
                continue
            found = []
            if stats.null_count:
                found.append(f"{stats.null_count} nulls")
            if stats.has_min_max:
                if _is_inf(stats.min) or _is_inf(stats.max):
                    found.append(f"min {stats.min}, max {stats.max}")
            elif stats.null_count < rg.num_rows:
                self.unchecked_row_groups += 1   # all NaN, or a writer without min/max
            if found:
                self.bad_row_groups.append(f"{', '.join(found)} in row group {g} ({rg.num_rows} rows) of {uri}")


def _leaf_index(meta, name: str) -> int | None:
    schema = meta.schema
    for i in range(len(schema)):
        if schema.column(i).path == name:
            return i
    return None


def _is_inf(value) -> bool:
    return isinstance(value, float) and value in (float("inf"), float("-inf"))


def manifest_types(manifest: Manifest) -> dict[str, pa.DataType | None]:
    return {n: pa.type_for_alias(t) if _alias_ok(t) else _DICTIONARY if t.startswith("dictionary<") else None
            for n, t in manifest.schema.items()}


_DICTIONARY = pa.dictionary(pa.int32(), pa.string())   # a stored dictionary column (its exact type does not matter)


def _alias_ok(t: str) -> bool:
    try:
        pa.type_for_alias(t)
        return True
    except ValueError:
        return False


def check_positive_int(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValidationError(f"{name} must be an integer >= {minimum}, got {value!r}")


# Characters the libraries refuse in feature names (XGBoost: ``[``, ``]``, ``<``; LightGBM: JSON's specials).
FORBIDDEN_NAME_CHARS = {"XGBoost": "[]<", "LightGBM": '",:[]{}'}


def check_feature_names(framework: str, names: list[str]) -> None:
    """Refuse, naming them, the columns whose names the framework cannot take."""
    chars = FORBIDDEN_NAME_CHARS[framework]
    bad = [n for n in names if any(c in n for c in chars)]
    if bad:
        fixed = {n: "".join("_" if c in chars else c for c in n) for n in bad}
        raise ValidationError(f"{framework} does not accept feature names containing any of {list(chars)}: {bad}; "
                              f"rename those columns, e.g. df.rename(columns={fixed})")
