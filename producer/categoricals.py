"""Which feature columns are categorical, checked at the caller; and frames encoded for ``predict``.

Declaring (decision; the README's "Categorical features" says the same):

- ``fit(..., categorical_cols=[...])`` names categorical columns for both estimators
  (strings, pandas ``category``/Arrow dictionary, or integers that are codes already);
- XGBoost: ``params={"enable_categorical": True}`` makes every ``category``/dictionary
  column categorical, as ``xgboost.DMatrix(enable_categorical=True)`` does; plain string
  columns still have to be named (XGBoost itself refuses them);
- LightGBM: ``category``/dictionary columns are categorical automatically (LightGBM's
  ``categorical_feature="auto"``), and ``params={"categorical_feature": [...]}`` (names
  or indices into the input columns, or LightGBM's ``"name:a,b"``) names more;
- a dataset already in the store (``from_uri``) keeps the categorical columns its
  manifest maps.

Anything else that is not a number fails here, naming the columns and how to declare them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from common.categories import CategoryEncoder, Mapping, is_encodable
from common.errors import ValidationError

# LightGBM's aliases of categorical_feature (its docs' "aliases" list).
LIGHTGBM_CATEGORICAL_ALIASES = ("categorical_feature", "cat_feature", "categorical_column", "cat_column",
                                "categorical_features")


@dataclass(frozen=True)
class Declaration:
    """What the user declared: names (or indices into the input columns), and whether every
    dictionary column counts as categorical. ``how`` tells the user how to declare one."""

    names: tuple = ()
    dictionaries: bool = False
    how: str = "fit(..., categorical_cols=[...])"
    how_dictionaries: str = ""   # how to make every dictionary column categorical, where that differs


def lightgbm_names(value) -> list:
    """LightGBM's ``categorical_feature`` as a list of names or indices ("name:a,b", "0,1", or a list)."""
    if value is None or value == "auto" or value == "":
        return []
    if isinstance(value, str):
        if value.startswith("name:"):
            return [v for v in value[5:].split(",") if v]
        return [int(v) if v.strip().lstrip("-").isdigit() else v for v in value.split(",") if v]
    if isinstance(value, (int, str)):
        return [value]
    return list(value)


def _resolve_names(names: Sequence, input_cols: list[str]) -> list[str]:
    out = []
    for n in names:
        if isinstance(n, bool) or not isinstance(n, (str, int)):
            raise ValidationError(f"categorical columns are named by column name or index, got {n!r}")
        if isinstance(n, int):
            if not 0 <= n < len(input_cols):
                raise ValidationError(f"categorical column index {n} is not an input column index "
                                      f"(0..{len(input_cols) - 1} of {input_cols})")
            n = input_cols[n]
        elif n not in input_cols:
            raise ValidationError(f"categorical column {n!r} is not an input column (input columns: {input_cols})")
        out.append(n)
    return out


def _categorical_ok(t: pa.DataType | None) -> bool:
    return t is None or is_encodable(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)


def categorical_columns(name: str, types: dict[str, pa.DataType | None], input_cols: list[str],
                        declared: Declaration, stored: Mapping | None = None) -> list[str]:
    """The categorical features of dataset ``name``, in input order; a dictionary column that is not
    declared (where dictionaries are not automatic) is refused, saying how to declare it."""
    chosen = set(_resolve_names(declared.names, input_cols)) | set(stored or {})
    bad = {c: str(types[c]) for c in chosen if not _categorical_ok(types.get(c))}
    if bad:
        raise ValidationError(f"columns declared categorical in dataset {name!r} must be strings, pandas "
                              f"categories/Arrow dictionaries or integer codes, got {bad}")
    dictionaries = [c for c in input_cols if types.get(c) is not None and pa.types.is_dictionary(types[c])]
    if declared.dictionaries:
        chosen |= set(dictionaries)
    undeclared = [c for c in dictionaries if c not in chosen]
    if undeclared:
        raise ValidationError(f"categorical (pandas category / Arrow dictionary) columns {undeclared} in dataset "
                              f"{name!r} are not declared: declare them with {declared.how_dictionaries or declared.how} to train them "
                              "natively, or encode them as numbers")
    return [c for c in input_cols if c in chosen]


def encoded_columns(types: dict[str, pa.DataType | None], categorical: list[str]) -> list[str]:
    """The categorical columns stored as codes (strings and dictionaries; integers are codes already)."""
    return [c for c in categorical if types.get(c) is not None and is_encodable(types[c])]


def string_hint(how: str, columns: list[str]) -> str:
    return (f"declare string columns categorical with {how.replace('[...]', repr(columns))} (trained natively), "
            "or encode them as numbers before training")


def encode_sample(sample: pa.Table, columns: list[str], mapping: Mapping) -> pa.Table:
    """The local sample with the training set's codes (as the fleet will see it)."""
    cols = [c for c in columns if c in mapping]
    if not cols:
        return sample
    encoder = CategoryEncoder(sample.schema, cols, known=mapping, frozen=True)
    return pa.Table.from_batches([encoder.encode(b) for b in sample.to_batches()], schema=encoder.schema)


def frame_matrix(frame, names: list[str], mapping: Mapping) -> np.ndarray:
    """A pandas frame's ``names`` columns as float32, categorical ones as the training set's codes
    (a category the training set did not have is NaN: missing)."""
    cols = []
    for c in names:
        values = frame[c]
        if c in mapping:
            arr = pa.array(values, from_pandas=True)
            if is_encodable(arr.type) or pa.types.is_null(arr.type):
                if pa.types.is_null(arr.type):
                    arr = arr.cast(pa.string())
                enc = CategoryEncoder(pa.schema([(c, arr.type)]), [c], known={c: mapping[c]}, frozen=True)
                arr = enc.codes(c, arr)
            cols.append(arr.to_numpy(zero_copy_only=False).astype(np.float32))
        else:
            try:
                cols.append(np.asarray(values, dtype=np.float32))
            except (TypeError, ValueError) as exc:
                raise ValidationError(f"predict: column {c!r} is not numeric ({values.dtype}), but the model "
                                      "was trained on it as a number") from exc
    return np.column_stack(cols) if cols else np.empty((len(frame), 0), dtype=np.float32)
