"""Statistics of the prepare stage: per-block counts (pure functions on Arrow tables) and their summary."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from raylm.data.clean import DROP_REASONS, KEPT
from raylm.data.split import SPLITS


def count_by_reason(block: pa.Table) -> pa.Table:
    """Per block: documents and bytes as read and after cleaning, by drop reason (`""` = kept)."""
    grouped = block.group_by("reason").aggregate([("id", "count"), ("raw_bytes", "sum"), ("bytes", "sum")])
    return pa.table(
        {
            "key": grouped.column("reason"),
            "documents": grouped.column("id_count"),
            "raw_bytes": grouped.column("raw_bytes_sum"),
            "bytes": grouped.column("bytes_sum"),
        }
    )


def count_by_split(block: pa.Table) -> pa.Table:
    """Per block: documents and bytes kept per split, and the copies dedup removed."""
    removed = pc.subtract(block.column("copies"), 1)
    block = (
        block.append_column("removed", removed)
        .append_column("removed_bytes", pc.multiply(removed, block.column("bytes")))
        .append_column("dup_group", pc.cast(pc.greater(block.column("copies"), 1), pa.int64()))
    )
    grouped = block.group_by("split").aggregate(
        [("id", "count"), ("bytes", "sum"), ("removed", "sum"), ("removed_bytes", "sum"), ("dup_group", "sum")]
    )
    return pa.table(
        {
            "key": grouped.column("split"),
            "documents": grouped.column("id_count"),
            "bytes": grouped.column("bytes_sum"),
            "removed": grouped.column("removed_sum"),
            "removed_bytes": grouped.column("removed_bytes_sum"),
            "dup_groups": grouped.column("dup_group_sum"),
        }
    )


def build_stats(num_files: int, by_reason: dict[str, dict], by_split: dict[str, dict]) -> dict:
    """The stats of one run: documents and bytes (UTF-8) coming out of each step, and what each step removed.

    `by_reason` and `by_split` are the summed outputs of `count_by_reason` and `count_by_split`.
    """

    def total(rows: dict[str, dict], field: str) -> int:
        return int(sum(r.get(field, 0) for r in rows.values()))

    zero = {"documents": 0, "bytes": 0}
    kept = by_reason.get(KEPT, {"documents": 0, "bytes": 0})
    removed_by_filter = {
        reason: {"documents": int(r["documents"]), "bytes": int(r["bytes"])}
        for reason in DROP_REASONS
        for r in [by_reason.get(reason, zero)]
    }
    return {
        "input_files": num_files,
        "read": {"documents": total(by_reason, "documents"), "bytes": total(by_reason, "raw_bytes")},
        "clean": {"documents": total(by_reason, "documents"), "bytes": total(by_reason, "bytes")},
        "filter": {"documents": int(kept["documents"]), "bytes": int(kept["bytes"]), "removed": removed_by_filter},
        "dedup_exact": {
            "documents": total(by_split, "documents"),
            "bytes": total(by_split, "bytes"),
            "removed": {"documents": total(by_split, "removed"), "bytes": total(by_split, "removed_bytes")},
            "duplicate_groups": total(by_split, "dup_groups"),
        },
        "split": {
            split: {"documents": int(r["documents"]), "bytes": int(r["bytes"])}
            for split in SPLITS
            for r in [by_split.get(split, zero)]
        },
    }
