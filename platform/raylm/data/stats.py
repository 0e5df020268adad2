"""Statistics of the prepare stage: per-block counts (pure functions on Arrow tables), their sums, and the report.

Every step reports documents, UTF-8 bytes and an estimate of tokens (bytes / 4, the usual
ratio of English text under a byte-level BPE) coming out of it and removed by it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BYTES_PER_TOKEN = 4
PII_KINDS = ("email", "ip_address", "phone_number")


def volume(documents: int, nbytes: int) -> dict:
    """{documents, bytes, tokens_est}."""
    return {"documents": int(documents), "bytes": int(nbytes), "tokens_est": int(nbytes) // BYTES_PER_TOKEN}


def sum_rows(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Sum count rows (`key` plus numeric fields) by key: the driver's half of a per-block count."""
    sums: dict[str, dict[str, int]] = {}
    for row in rows:
        acc = sums.setdefault(row["key"], {})
        for field, value in row.items():
            if field != "key":
                acc[field] = acc.get(field, 0) + int(value)
    return sums


def count_documents(block: pa.Table) -> pa.Table:
    """Per block of the documents step: counts by outcome (`kept`, a filter name, `empty`, `quarantined:<kind>`)."""
    reason = block.column("reason")
    key = pc.if_else(
        pc.equal(reason, "quarantined"),
        pc.binary_join_element_wise("quarantined:", pc.fill_null(block.column("error_kind"), "unknown"), ""),
        pc.if_else(pc.equal(reason, ""), "kept", reason),
    )
    table = pa.table(
        {"key": key, "raw_bytes": block.column("raw_bytes"), "bytes": block.column("bytes")}
        | {f"pii_{k}": block.column(f"pii_{k}") for k in PII_KINDS}
    )
    grouped = table.group_by("key").aggregate(
        [("key", "count")] + [(c, "sum") for c in table.column_names if c != "key"]
    )
    return grouped.rename_columns([c.removesuffix("_sum").replace("key_count", "documents") for c in grouped.column_names])


def count_exact(block: pa.Table) -> pa.Table:
    """Per block of the exact step: kept and removed documents and bytes, and duplicate clusters by size."""
    kept = pc.equal(block.column("id"), block.column("kept_id"))
    keys = pc.if_else(kept, "kept", "removed")
    # A cluster is counted once, at its representative: key `cluster:<size>`.
    in_cluster = pc.and_(kept, pc.greater(block.column("copies"), 1))
    keys = pc.if_else(in_cluster, pc.binary_join_element_wise("cluster:", pc.cast(block.column("copies"), pa.string()), ""), keys)
    table = pa.table({"key": keys, "bytes": block.column("bytes")})
    return table.group_by("key").aggregate([("key", "count"), ("bytes", "sum")]).rename_columns(
        ["key", "documents", "bytes"]
    )


def count_split(block: pa.Table) -> pa.Table:
    """Per block of the final documents: documents and bytes per split."""
    grouped = block.group_by("split").aggregate([("split", "count"), ("bytes", "sum")])
    return grouped.rename_columns(["key", "documents", "bytes"])


def count_candidates(block: pa.Table, *, threshold: float) -> pa.Table:
    """Per block of candidate pairs: verified and rejected pairs, and a Jaccard histogram in tenths."""
    jac = block.column("jaccard").to_numpy()
    tenth = np.minimum((jac * 10).astype(np.int64), 9)
    keys = [f"jaccard:{t / 10:.1f}" for t in tenth.tolist()]
    verdict = np.where(jac >= threshold, "verified", "rejected").tolist()
    table = pa.table({"key": pa.array(keys + verdict, pa.string())})
    return table.group_by("key").aggregate([("key", "count")]).rename_columns(["key", "documents"])


def size_histogram(sizes: dict[int, int]) -> dict[str, int]:
    """Cluster count per size bin: 2, 3, 4-7, 8-15, ... (powers of two)."""
    bins: dict[str, int] = {}
    for size, count in sorted(sizes.items()):
        if size <= 3:
            label = str(size)
        else:
            low = 1 << (size.bit_length() - 1)
            label = f"{low}-{2 * low - 1}"
        bins[label] = bins.get(label, 0) + int(count)
    return bins


def format_report(stats: dict) -> str:
    """The human-readable summary of a prepare run (also written as report.md)."""
    lines = ["# prepare report", "", f"Input files: {stats['input_files']}", ""]
    lines += ["| step | documents | MB | tokens (est.) | removed docs | removed MB |", "|---|---:|---:|---:|---:|---:|"]

    def row(name: str, out: dict, removed: dict | None = None) -> str:
        rem = removed or {"documents": 0, "bytes": 0}
        return (
            f"| {name} | {out['documents']:,} | {out['bytes'] / 1e6:.2f} | {out['tokens_est']:,} "
            f"| {rem['documents']:,} | {rem['bytes'] / 1e6:.2f} |"
        )

    lines.append(row("read", stats["read"]))
    lines.append(row("clean", stats["clean"], {"documents": stats["quarantined"]["documents"], "bytes": 0}))
    lines.append(row("filter", stats["filter"], stats["filter"]["removed_total"]))
    for step in ("dedup_exact", "dedup_fuzzy"):
        if stats[step].get("enabled", True):
            lines.append(row(step, stats[step], stats[step]["removed"]))
    for split, v in stats["split"].items():
        lines.append(row(f"split: {split}", v))
    lines += ["", "Removed by filter (first failing filter):", ""]
    for reason, v in stats["filter"]["removed"].items():
        if v["documents"]:
            lines.append(f"- {reason}: {v['documents']:,} documents, {v['bytes'] / 1e6:.2f} MB")
    if not any(v["documents"] for v in stats["filter"]["removed"].values()):
        lines.append("- none")
    q = stats["quarantined"]
    lines += ["", f"Quarantined records: {q['documents']:,}" + (f" ({_kinds(q['by_kind'])})" if q["documents"] else "")]
    pii = stats["clean"].get("pii_redacted", {})
    if any(pii.values()):
        lines.append("PII redacted: " + ", ".join(f"{k} {v:,}" for k, v in pii.items()))
    ex = stats["dedup_exact"]
    if ex.get("enabled", True):
        lines += ["", f"Exact duplicates: {ex['removed']['documents']:,} removed in {ex['clusters']:,} clusters"
                  f" (sizes: {_kinds(ex['cluster_sizes']) or 'none'})"]  # fmt: skip
    fz = stats["dedup_fuzzy"]
    if fz.get("enabled", True):
        lines += [
            f"Near duplicates: {fz['removed']['documents']:,} removed in {fz['clusters']:,} clusters"
            f" (sizes: {_kinds(fz['cluster_sizes']) or 'none'}); LSH {fz['lsh']['bands']} bands × {fz['lsh']['rows']} rows;"
            f" {fz['candidate_pairs']:,} candidate pairs, {fz['verified_pairs']:,} verified at Jaccard ≥ {fz['threshold']},"
            f" {fz['rejected_pairs']:,} rejected; {fz['iterations']} connected-components rounds",
        ]
    lines += ["", "Seconds per step: " + ", ".join(f"{k} {v:.1f}" for k, v in stats["seconds"].items())]
    return "\n".join(lines) + "\n"


def _kinds(counts: dict) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in counts.items() if v)
