"""Exact deduplication across all shards: one document per distinct cleaned text.

Every document's cleaned text is hashed (BLAKE2b-128) and the dataset is hash-partitioned on
that hash (`map_partitions`, one Ray Data shuffle), so copies meet wherever they were read
from. In each partition the rows are sorted by (hash, id): the first row of each run of equal
hashes, the smallest id, is kept. The outcome depends only on the documents, not on how they
were sharded, blocked, or partitioned.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.data.shuffle import map_partitions

EXACT_SCHEMA = pa.schema(
    [("id", pa.string()), ("text", pa.string()), ("bytes", pa.int64()), ("hash", pa.string()),
     ("kept_id", pa.string()), ("copies", pa.int64())]
)  # fmt: skip
"""Rows out of `dedup_exact`: every document; `kept_id` is its group's representative, `copies` the group's size.
A removed document's `text` is emptied (the representative holds it)."""


HASHED_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("bytes", pa.int64()), ("hash", pa.string())])


def text_hash(text: str) -> str:
    """Hex BLAKE2b-128 of the UTF-8 text: the dedup key (collisions are negligible below ~10^18 documents)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def add_text_hash(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: append column `hash` = `text_hash(text)`."""
    hashes = [text_hash(t) for t in batch.column("text").to_pylist()]
    return batch.append_column("hash", pa.array(hashes, pa.string()))


def mark_duplicates(part: pa.Table) -> pa.Table:
    """Of one hash partition (columns id, text, bytes, hash): every row with `kept_id` and `copies` (EXACT_SCHEMA)."""
    part = part.sort_by([("hash", "ascending"), ("id", "ascending")])
    hashes = np.asarray(part.column("hash").to_numpy(zero_copy_only=False))
    n = len(hashes)
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]]) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n])
    group_start = np.repeat(starts, sizes)
    kept = group_start == np.arange(n)
    ids = part.column("id").combine_chunks()
    text = pc.if_else(pa.array(kept), part.column("text"), pa.scalar("", pa.string()))
    return pa.table(
        {
            "id": ids,
            "text": text,
            "bytes": part.column("bytes"),
            "hash": part.column("hash"),
            "kept_id": ids.take(pa.array(group_start, pa.int64())),
            "copies": pa.array(np.repeat(sizes, sizes), pa.int64()),
        },
        schema=EXACT_SCHEMA,
    )


def dedup_exact(ds, num_partitions: int):
    """Every row of `ds` (columns id, text, bytes) marked with its exact-duplicate group: EXACT_SCHEMA.

    Keep the rows with `id == kept_id`; the others are copies. A global shuffle, not per shard.
    """
    hashed = ds.select_columns(["id", "text", "bytes"]).map_batches(add_text_hash, batch_format="pyarrow")
    return map_partitions(hashed, "hash", num_partitions, mark_duplicates, schema=HASHED_SCHEMA)
