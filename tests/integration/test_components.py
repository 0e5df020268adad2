"""Distributed connected components (large-star / small-star on Ray Data) against a single-machine union-find."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from raylm.data.components import connected_components, large_star, small_star, union_find_components


def _run(ray, pairs: list[tuple[str, str]], partitions: int = 4, blocks: int = 3):
    table = pa.table({"a": [a for a, _ in pairs], "b": [b for _, b in pairs]})
    step = max(1, len(pairs) // blocks)
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(pairs), step)])
    comps, stats = connected_components(ds, partitions)
    return {r["id"]: r["root"] for r in comps.take_all()}, stats


def _expected(pairs):
    return union_find_components([(a, b) for a, b in pairs if a != b])


def test_long_chain_in_random_order(ray_local):
    rng = random.Random(1)
    ids = [f"n{i:04d}" for i in range(1000)]
    rng.shuffle(ids)
    pairs = list(zip(ids[:-1], ids[1:]))
    got, stats = _run(ray_local, pairs)
    assert got == _expected(pairs) and set(got.values()) == {"n0000"}
    assert stats["components"] == 1 and stats["nodes"] == 1000 and stats["iterations"] <= 20


def test_random_graph_with_duplicates_self_loops_and_many_components(ray_local):
    rng = random.Random(2)
    pairs = [(f"r{rng.randrange(600)}", f"r{rng.randrange(600)}") for _ in range(500)]
    pairs += pairs[:50] + [("solo", "solo"), ("s", "s")]  # repeated edges and self-loops
    pairs += [("star0", f"star{i}") for i in range(1, 60)]
    got, stats = _run(ray_local, pairs)
    expected = _expected(pairs)
    assert got == expected
    assert "solo" not in got  # a node with only a self-loop has no edge
    assert stats["components"] == len(set(expected.values()))


@pytest.mark.parametrize("partitions, blocks", [(1, 1), (7, 5)])
def test_result_does_not_depend_on_partitions_or_blocks(ray_local, partitions, blocks):
    rng = random.Random(3)
    pairs = [(f"x{rng.randrange(300)}", f"x{rng.randrange(300)}") for _ in range(250)]
    assert _run(ray_local, pairs, partitions, blocks)[0] == _expected(pairs)


def test_empty_graph(ray_local):
    ds = ray_local.data.from_arrow(pa.table({"a": pa.array([], pa.string()), "b": pa.array([], pa.string())}))
    comps, stats = connected_components(ds, 4)
    assert comps.count() == 0 and stats["components"] == 0


def test_star_steps_on_one_partition():
    # Path c - a - b as directed edges both ways: large-star links every larger neighbour to the minimum.
    edges = pa.table({"u": ["a", "a", "b", "c"], "v": ["b", "c", "a", "a"]})
    out = large_star(edges)
    pairs = {(u, v) for u, v in zip(out["u"].to_pylist(), out["v"].to_pylist()) if u is not None}
    assert pairs == {("b", "a"), ("a", "b"), ("c", "a"), ("a", "c")}
    assert sum(x for x in out["unsettled"].to_pylist() if x is not None) == 0  # already a star around "a"
    # c linked to a and b: small-star hangs c and its smaller neighbour b from their minimum a.
    vee = pa.table({"u": ["c", "c", "a", "b"], "v": ["a", "b", "c", "c"]})
    out = small_star(vee)
    assert set(zip(out["u"].to_pylist(), out["v"].to_pylist())) == {("b", "a"), ("a", "b"), ("c", "a"), ("a", "c")}
