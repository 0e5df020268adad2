"""Exact deduplication across all shards: one document per distinct cleaned text.

Documents are grouped by a 128-bit hash of their cleaned text with a Ray Data groupby, which
hash-partitions the whole dataset, so copies meet wherever they were read from. Of each group
the document with the smallest id is kept; the outcome depends only on the documents, not on
how they were sharded or on the number of partitions.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc


def text_hash(text: str) -> str:
    """Hex BLAKE2b-128 of the UTF-8 text: the dedup key (collisions are negligible below ~10^18 documents)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def add_text_hash(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: append column `hash` = `text_hash(text)`."""
    hashes = [text_hash(t) for t in batch.column("text").to_pylist()]
    return batch.append_column("hash", pa.array(hashes, pa.string()))


def keep_smallest_id(group: pa.Table) -> pa.Table:
    """Ray Data map_groups function: of one group of identical texts, the row with the smallest id.

    Adds column `copies`, the size of the group (1 for a unique document).
    """
    first = pc.sort_indices(group, sort_keys=[("id", "ascending")])[:1]
    kept = group.take(first)
    return kept.append_column("copies", pa.array([group.num_rows], pa.int64()))


def dedup_exact(ds, num_partitions: int):
    """The Ray Dataset `ds` (columns `id`, `text`, ...) with one row per distinct `text`, plus `hash` and `copies`.

    A global shuffle on the text hash into `num_partitions` partitions; not per shard.
    """
    return (
        ds.map_batches(add_text_hash, batch_format="pyarrow")
        .groupby("hash", num_partitions=num_partitions)
        .map_groups(keep_smallest_id, batch_format="pyarrow")
    )
