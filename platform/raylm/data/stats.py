"""Statistics of the prepare stage: per-block counts (pure functions on Arrow tables), their sums, the run's
stats (`build_stats`) and the report.

Every step reports documents, UTF-8 bytes and an estimate of tokens (bytes / 4, the usual
ratio of English text under a byte-level BPE) coming out of it and removed by it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.data.filters import FILTER_NAMES
from raylm.data.split import SPLITS

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


def count_cluster_sizes(part: pa.Table) -> pa.Table:
    """Per partition of component roots (`root`, one row per node): how many clusters have each size."""
    per_root = part.group_by("root").aggregate([("root", "count")])
    hist = per_root.group_by("root_count").aggregate([("root_count", "count")])
    return pa.table({"size": hist.column(0), "clusters": hist.column(1)})


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


def build_stats(num_files: int, docs: dict, exact: dict, fuzzy: dict, by_split: dict, output_seconds: float) -> dict:
    """The stats of one run: documents, bytes and tokens out of each step, and what each removed."""
    seconds = {"documents": docs["seconds"]}
    docs = {k: v for k, v in docs.items() if k != "seconds"}
    zero = {"documents": 0, "raw_bytes": 0, "bytes": 0}
    good = {k: v for k, v in docs.items() if not k.startswith("quarantined:")}
    quarantined = {k.split(":", 1)[1]: v["documents"] for k, v in docs.items() if k.startswith("quarantined:")}
    read_docs = sum(v["documents"] for v in good.values())
    read_bytes = sum(v["raw_bytes"] for v in good.values())
    clean_bytes = sum(v["bytes"] for v in good.values())
    kept = docs.get("kept", zero)
    removed = {r: volume(docs.get(r, zero)["documents"], docs.get(r, zero)["bytes"]) for r in ("empty", *FILTER_NAMES)}
    stats = {
        "input_files": num_files,
        "read": volume(read_docs, read_bytes),
        "quarantined": {"documents": sum(quarantined.values()), "by_kind": dict(sorted(quarantined.items()))},
        "clean": volume(read_docs, clean_bytes)
        | {"pii_redacted": {k: sum(v.get(f"pii_{k}", 0) for v in good.values()) for k in PII_KINDS}},
        "filter": volume(kept["documents"], kept["bytes"])
        | {"removed": removed, "removed_total": volume(read_docs - kept["documents"], clean_bytes - kept["bytes"])},
    }
    before = stats["filter"]
    if exact.get("enabled", True):
        sizes = {int(k.split(":")[1]): v["documents"] for k, v in exact.items() if k.startswith("cluster:")}
        kept_docs = exact.get("kept", zero)["documents"] + sum(
            v["documents"] for k, v in exact.items() if k.startswith("cluster:")
        )
        kept_bytes = exact.get("kept", zero)["bytes"] + sum(
            v["bytes"] for k, v in exact.items() if k.startswith("cluster:")
        )
        rem = exact.get("removed", zero)
        stats["dedup_exact"] = volume(kept_docs, kept_bytes) | {
            "removed": volume(rem["documents"], rem["bytes"]),
            "clusters": sum(sizes.values()),
            "cluster_sizes": size_histogram(sizes),
        }
        seconds["dedup_exact"] = exact["seconds"]
        before = stats["dedup_exact"]
    else:
        stats["dedup_exact"] = {"enabled": False}
    if fuzzy.get("enabled", True):
        cand, comp, kept_f = fuzzy["candidates"], fuzzy["components"], fuzzy["kept"]
        sizes = {int(k): v for k, v in comp.get("cluster_sizes", {}).items()}
        stats["dedup_fuzzy"] = volume(kept_f["documents"], kept_f["bytes"]) | {
            "removed": volume(before["documents"] - kept_f["documents"], before["bytes"] - kept_f["bytes"]),
            "clusters": comp.get("clusters", 0),
            "cluster_sizes": size_histogram(sizes),
            "candidate_pairs": cand.get("verified", {}).get("documents", 0) + cand.get("rejected", {}).get("documents", 0),
            "verified_pairs": cand.get("verified", {}).get("documents", 0),
            "rejected_pairs": cand.get("rejected", {}).get("documents", 0),
            "candidate_jaccard": {k.split(":")[1]: v["documents"] for k, v in sorted(cand.items()) if k.startswith("jaccard:")},
            "iterations": comp.get("iterations", 0),
            "seconds": {"candidates": cand["seconds"], "components": comp["seconds"], "remove": kept_f["seconds"]},
            "lsh": fuzzy["lsh"],
            "threshold": fuzzy["threshold"],
        }
        seconds["dedup_fuzzy"] = fuzzy["seconds"]
    else:
        stats["dedup_fuzzy"] = {"enabled": False}
    stats["split"] = {s: volume(by_split.get(s, zero)["documents"], by_split.get(s, zero)["bytes"]) for s in SPLITS}
    stats["seconds"] = seconds | {"split_and_write": output_seconds}
    return stats


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
