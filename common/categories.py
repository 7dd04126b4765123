"""Categorical columns as int32 codes with ONE mapping per dataset (pure, no I/O).

A categorical column (an Arrow dictionary, e.g. a pandas ``category``, or a string
column declared categorical) is stored as int32 codes; its mapping, column -> list of
categories (code = position), goes into the dataset's manifest. The encoder is built
while the dataset streams through ingest, so every chunk, hence every rank's shard,
and ``predict`` at the caller use the same codes:

- a dictionary column contributes its dictionary in its own order (a pandas
  ``category`` keeps its category order, unused categories included), new values of
  later batches are appended;
- a string column contributes its values in first-seen order (stable: one producer
  writes the chunks in order);
- nulls stay null (missing); a ``frozen`` encoder (an eval set, ``predict``) maps
  values its mapping lacks to null as well, so an unseen category counts as missing.
"""
from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from common.errors import DatasetError

CODE_TYPE = pa.int32()
Mapping = dict[str, list]   # column -> categories; a value's code is its position


def is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view",
                                                                              lambda _: False)(t)


def is_encodable(t: pa.DataType) -> bool:
    """A column type that is stored as codes when declared categorical (numbers are their own codes)."""
    if pa.types.is_dictionary(t):
        v = t.value_type
        return is_text(v) or pa.types.is_integer(v) or pa.types.is_boolean(v)
    return is_text(t)


class CategoryEncoder:
    """Encodes ``columns`` of a stream of record batches to int32 codes, growing one mapping.

    ``known`` seeds the mapping (an eval set starts from its training set's); ``frozen``
    never grows it: values outside it become null."""

    def __init__(self, schema: pa.Schema, columns: Iterable[str], known: Mapping | None = None,
                 frozen: bool = False) -> None:
        self.input_schema = schema
        self.columns = [c for c in schema.names if c in set(columns)]
        for c in self.columns:
            t = schema.field(c).type
            if not is_encodable(t) and not (pa.types.is_integer(t) and c in (known or {})):
                raise DatasetError(f"column {c!r} of type {t} cannot be encoded as categorical codes "
                                   "(string or dictionary columns only)")
        self.frozen = frozen
        self.mapping: Mapping = {c: list((known or {}).get(c, [])) for c in self.columns}
        self._index = {c: {v: i for i, v in enumerate(vals)} for c, vals in self.mapping.items()}
        self.schema = pa.schema([pa.field(f.name, CODE_TYPE) if f.name in self.mapping else f for f in schema],
                                metadata=schema.metadata)

    def _remap(self, column: str, dictionary: pa.Array) -> pa.Array:
        """Global code of each dictionary entry (null where a frozen mapping lacks it), growing the mapping
        in the dictionary's order. Python work is per distinct value of the batch, not per category."""
        index, mapping = self._index[column], self.mapping[column]
        out = []
        for v in dictionary.to_pylist():
            code = index.get(v)
            if code is None and v is not None and not self.frozen:
                code = index[v] = len(mapping)
                mapping.append(v)
            out.append(code)
        return pa.array(out, type=CODE_TYPE)

    def codes(self, column: str, values: pa.Array | pa.ChunkedArray) -> pa.Array:
        """``values`` (strings, a dictionary array, or codes already) as int32 codes of ``column``."""
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if pa.types.is_integer(values.type):   # a stored dataset's codes: already encoded
            return values.cast(CODE_TYPE)
        if not pa.types.is_dictionary(values.type):
            values = pc.dictionary_encode(values)   # its dictionary is in first-seen order, nulls stay null
        return self._remap(column, values.dictionary).take(values.indices)

    def encode(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if not self.columns:
            return batch
        arrays = []
        for f in self.input_schema:
            i = batch.schema.get_field_index(f.name)
            if i < 0 or (f.name not in self.mapping and batch.schema.field(i).type != f.type):
                raise DatasetError(f"batch has schema {_types(batch.schema)}, but the dataset has "
                                   f"{_types(self.input_schema)}")
            col = batch.column(i)
            arrays.append(self.codes(f.name, col) if f.name in self.mapping else col)
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def encode_all(self, batches: Iterable[pa.RecordBatch]):
        for batch in batches:
            yield self.encode(batch)


def xgboost_feature_types(features: list[str], categorical: list[str]) -> list[str] | None:
    """XGBoost's ``feature_types``: "c" for a categorical feature (its codes), "q" for a number."""
    return ["c" if f in categorical else "q" for f in features] if categorical else None


def _types(schema: pa.Schema) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


def check_mapping(mapping: Mapping) -> None:
    """Categories must survive the manifest's JSON unchanged."""
    for column, values in mapping.items():
        bad = [v for v in values if not isinstance(v, (str, int, bool))]
        if bad:
            raise DatasetError(f"categories of column {column!r} must be strings or integers, got "
                               f"{bad[:3]!r} ({type(bad[0]).__name__})")


def decode(codes: pa.Array | pa.ChunkedArray, categories: list) -> pa.DictionaryArray:
    """Codes back to a dictionary array of the categories (what a pandas ``category`` becomes)."""
    if isinstance(codes, pa.ChunkedArray):
        codes = codes.combine_chunks()
    return pa.DictionaryArray.from_arrays(codes.cast(CODE_TYPE), pa.array(categories))


def decode_table(table: pa.Table, categories: Mapping) -> pa.Table:
    """A stored table with its categorical codes turned back into dictionary columns."""
    for column, values in categories.items():
        i = table.schema.get_field_index(column)
        if i >= 0:
            table = table.set_column(i, column, decode(table.column(i), values))
    return table
