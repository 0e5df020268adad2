"""Hash partitioning on Ray Data: give a function every row of one key partition at once.

Exact dedup, LSH buckets, pair verification and connected components all need "all rows with
the same key in one place". `map_partitions` does it with one Ray Data shuffle: each row gets a
partition number from a stable hash of its key (the same in every process and on every run),
the dataset is grouped by that number, and `fn` receives one whole partition as an Arrow
table and works on it with vectorized code. Partition contents do not depend on how the
input was sharded or blocked, so neither does anything computed from them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import ray
from ray.data.context import ShuffleStrategy

PART = "_part"
"""The column holding a row's partition number while it is being shuffled."""


def stable_hash64(values: list[Any]) -> np.ndarray:
    """uint64 hashes of strings (or their str()) that are the same in every process (unlike `hash()`)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(v).encode("utf-8"), digest_size=8).digest(), "little") for v in values),
        dtype=np.uint64,
        count=len(values),
    )


def partition_of(column: pa.ChunkedArray | pa.Array, num_partitions: int) -> np.ndarray:
    """Partition numbers in [0, num_partitions) for a key column: integer keys mix their bits, others hash their text."""
    if pa.types.is_integer(column.type):
        keys = np.asarray(column.to_numpy(zero_copy_only=False)).astype(np.uint64)
        keys = _mix64(keys)
    else:
        keys = stable_hash64(column.to_pylist())
    return (keys % np.uint64(num_partitions)).astype(np.int64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: spreads structured integer keys (band ids, counters) over all 64 bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


SENTINEL = "_sentinel"
"""Marks the one placeholder row each partition gets, so that no partition and no shuffle is ever empty."""


def _add_partition(batch: pa.Table, *, key: str, num_partitions: int, schema: pa.Schema) -> pa.Table:
    # Exactly the placeholders' schema (Parquet reads add metadata, shuffles need equal schemas).
    batch = batch.select(schema.names).cast(schema).replace_schema_metadata(None)
    batch = batch.append_column(PART, pa.array(partition_of(batch.column(key), num_partitions), pa.int64()))
    return batch.append_column(SENTINEL, pa.array([False] * batch.num_rows, pa.bool_()))


def _sentinels(schema: pa.Schema, num_partitions: int) -> pa.Table:
    columns = {f.name: pa.nulls(num_partitions, f.type) for f in schema}
    columns[PART] = pa.array(range(num_partitions), pa.int64())
    columns[SENTINEL] = pa.array([True] * num_partitions, pa.bool_())
    return pa.table(columns)


def _call_on_partition(group: pa.Table, *, fn: Callable[..., pa.Table], fn_kwargs: dict) -> pa.Table:
    real = group.filter(pa.compute.invert(group.column(SENTINEL)))
    return fn(real.drop_columns([PART, SENTINEL]), **fn_kwargs)


GROUPING_SHUFFLE = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
"""The shuffle every `map_partitions` groups with.

Ray 2.60's default strategy (SHUFFLE_V2) fails to reduce a partition that received an empty
block without a schema (what a filter that matched nothing in a block produces): "Schema at
index 1 was different". The sort-based shuffle concatenates such blocks correctly. It is set on
the dataset being grouped, not on the process's DataContext: a dataset keeps the settings of
the context it was made from, so a process-wide setting would miss datasets made before it.
"""


def map_partitions(ds, key: str, num_partitions: int, fn: Callable[..., pa.Table], *, schema: pa.Schema, **fn_kwargs):
    """A Ray Dataset of `fn(partition, **fn_kwargs)` for every hash partition of `ds` by column `key`.

    `ds` has the columns of `schema`. `fn` gets an Arrow table holding every row of `ds` whose
    `key` falls in its partition (possibly none: `fn` must accept an empty table) and returns
    an Arrow table. Each partition also gets one placeholder row, removed before `fn` sees it:
    Ray Data neither calls a batch function on an empty block nor groups an empty dataset, and
    a shuffle of filtered data can be empty.
    """
    tagged = ds.map_batches(
        _add_partition, batch_format="pyarrow", fn_kwargs={"key": key, "num_partitions": num_partitions, "schema": schema}
    )
    placeholders = ray.data.from_arrow(_sentinels(schema, num_partitions))
    grouped = tagged.union(placeholders)
    # The settings of this dataset, which it shares with the datasets it derives from (Ray Data passes a
    # dataset's DataContext on to the datasets made from it).
    grouped.context.shuffle_strategy = GROUPING_SHUFFLE
    return (
        grouped
        .groupby(PART, num_partitions=num_partitions)
        .map_groups(_call_on_partition, batch_format="pyarrow", fn_kwargs={"fn": fn, "fn_kwargs": fn_kwargs})
    )


SIDE = "_side"
KEY = "_key"


def tag_side(batch: pa.Table, *, key: str, side: int, schema: pa.Schema) -> pa.Table:
    """One side's batch in the common schema: its key as `_key`, `_side` 0 or 1, the other side's columns null."""
    columns = {KEY: batch.column(key).cast(pa.string()), SIDE: pa.array([side] * batch.num_rows, pa.int8())}
    for field in schema:
        if field.name in (KEY, SIDE):
            continue
        columns[field.name] = (
            batch.column(field.name).cast(field.type)
            if field.name in batch.column_names
            else pa.nulls(batch.num_rows, field.type)
        )
    return pa.table(columns, schema=schema)


def split_sides(group: pa.Table, *, inner, left_names: list[str], right_names: list[str], fn_kwargs: dict) -> pa.Table:
    """`inner(left_rows, right_rows, **fn_kwargs)` of a partition of rows tagged by `tag_side`, each side in its own columns."""
    side = group.column(SIDE).to_numpy()
    left = group.filter(pa.array(side == 0)).select(left_names)
    right = group.filter(pa.array(side == 1)).select(right_names)
    return inner(left, right, **fn_kwargs)


def co_group(left, right, left_key: str, right_key: str, left_schema: pa.Schema, right_schema: pa.Schema,
             num_partitions: int, fn: Callable[..., pa.Table], **fn_kwargs):  # fmt: skip
    """A Ray Dataset of `fn(left_rows, right_rows, **fn_kwargs)` for every hash partition of the two datasets' keys.

    The distributed form of a join: rows of `left` whose `left_key` and rows of `right` whose
    `right_key` fall in the same partition meet in one call, each as an Arrow table with its
    own columns (`left_schema`, `right_schema`; string keys), so `fn` can join, anti-join or
    look up with Arrow's vectorized kernels. Both keys are hashed as strings.
    """
    names = [KEY, SIDE]
    fields = [pa.field(KEY, pa.string()), pa.field(SIDE, pa.int8())]
    for field in [*left_schema, *right_schema]:
        if field.name not in names:
            names.append(field.name)
            fields.append(field.with_nullable(True))
    schema = pa.schema(fields)
    tagged = [
        ds.map_batches(tag_side, batch_format="pyarrow", fn_kwargs={"key": key, "side": side, "schema": schema})
        for ds, key, side in ((left, left_key, 0), (right, right_key, 1))
    ]
    return map_partitions(
        tagged[0].union(tagged[1]),
        KEY,
        num_partitions,
        split_sides,
        schema=schema,
        inner=fn,
        left_names=left_schema.names,
        right_names=right_schema.names,
        fn_kwargs=fn_kwargs,
    )
