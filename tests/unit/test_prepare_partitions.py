"""The per-partition functions of exact and fuzzy dedup and of the shuffle helpers (no Ray)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa

from raylm.data.dedup_exact import mark_duplicates, text_hash
from raylm.data.dedup_fuzzy import attach_text_a, bucket_pairs, drop_removed
from raylm.data.shuffle import partition_of, split_sides, stable_hash64, tag_side


def test_stable_hash_is_the_same_in_another_process():
    values = ["doc-1", "doc-2", "ünï", ""]
    here = stable_hash64(values).tolist()
    code = "from raylm.data.shuffle import stable_hash64; print(stable_hash64(['doc-1','doc-2','ünï','']).tolist())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert str(here) == there.strip()


def test_partitions_cover_range_and_spread_integer_keys():
    parts = partition_of(pa.array(np.arange(10_000, dtype=np.uint64) * 64), 8)  # structured keys
    assert parts.min() == 0 and parts.max() == 7
    counts = np.bincount(parts, minlength=8)
    assert counts.min() > 1000  # no partition starved by the keys' pattern
    strings = partition_of(pa.array([f"id{i}" for i in range(1000)]), 5)
    assert set(strings.tolist()) == {0, 1, 2, 3, 4}


def _docs(rows: list[tuple[str, str]]) -> pa.Table:
    return pa.table(
        {
            "id": [r[0] for r in rows],
            "text": [r[1] for r in rows],
            "bytes": [len(r[1].encode()) for r in rows],
            "hash": [text_hash(r[1]) for r in rows],
        }
    )


def test_mark_duplicates_keeps_smallest_id_per_text():
    table = _docs([("c", "same"), ("b", "other"), ("a", "same"), ("d", "same"), ("e", "alone")])
    out = {r["id"]: r for r in mark_duplicates(table).to_pylist()}
    assert {i: r["kept_id"] for i, r in out.items()} == {"a": "a", "c": "a", "d": "a", "b": "b", "e": "e"}
    assert {i: r["copies"] for i, r in out.items()} == {"a": 3, "c": 3, "d": 3, "b": 1, "e": 1}
    assert out["a"]["text"] == "same" and out["c"]["text"] == ""  # copies do not carry the text on


def test_mark_duplicates_empty_partition():
    assert mark_duplicates(_docs([])).num_rows == 0


def test_bucket_pairs_all_pairs_in_small_buckets_and_anchors_in_large():
    keys = [1, 1, 1, 2, 3, 3] + [9] * 10
    ids = ["c", "a", "b", "z", "y", "x"] + [f"m{i}" for i in range(10)]
    table = pa.table({"band_key": pa.array(keys, pa.uint64()), "id": ids})
    pairs = bucket_pairs(table, max_all_pairs=3, anchors=2).to_pylist()
    got = {(p["a"], p["b"]) for p in pairs}
    small = {("a", "b"), ("a", "c"), ("b", "c"), ("x", "y")}
    large = {("m0", f"m{i}") for i in range(1, 10)} | {("m1", f"m{i}") for i in range(2, 10)}
    assert got == small | large
    assert all(p["a"] < p["b"] for p in pairs)


def test_attach_text_a_drops_repeated_pairs_and_unknown_ids():
    pairs = pa.table({"a": ["a", "a", "b", "q"], "b": ["b", "b", "c", "r"]})
    docs = pa.table({"id": ["a", "b", "c"], "text": ["A", "B", "C"]})
    out = sorted((r["a"], r["b"], r["text_a"]) for r in attach_text_a(pairs, docs).to_pylist())
    assert out == [("a", "b", "A"), ("b", "c", "B")]


def test_drop_removed_is_an_anti_join():
    docs = pa.table({"id": ["a", "b", "c"], "text": ["A", "B", "C"], "bytes": [1, 1, 1]})
    removed = pa.table({"id": ["b"], "kept_id": ["a"]})
    assert drop_removed(docs, removed).column("id").to_pylist() == ["a", "c"]
    assert drop_removed(docs, removed.slice(0, 0)).num_rows == 3


def test_co_group_sides_round_trip():
    left_schema = pa.schema([("a", pa.string()), ("b", pa.string())])
    right_schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    schema = pa.schema([("_key", pa.string()), ("_side", pa.int8()), ("a", pa.string()), ("b", pa.string()),
                        ("id", pa.string()), ("text", pa.string())])  # fmt: skip
    left = tag_side(pa.table({"a": ["x"], "b": ["y"]}), key="a", side=0, schema=schema)
    right = tag_side(pa.table({"id": ["x"], "text": ["X"]}), key="id", side=1, schema=schema)
    both = pa.concat_tables([left, right])
    seen = split_sides(both, inner=lambda l, r: pa.table({"n": [l.num_rows, r.num_rows]}),
                       left_names=left_schema.names, right_names=right_schema.names, fn_kwargs={})  # fmt: skip
    assert seen.column("n").to_pylist() == [1, 1]
    assert both.column("_key").to_pylist() == ["x", "x"]
