"""Connected components of a large graph on Ray Data, without pulling its edges onto one node.

The alternating large-star / small-star algorithm (Kiveris et al., "Connected Components in
MapReduce and Beyond", SoCC 2014). Edges are stored in both directions, `(u, v)` and `(v, u)`,
and each step is one shuffle by `u` (`map_partitions`), after which a partition holds the whole
neighbourhood N(u) of each of its nodes:

- large-star: with m(u) = min(N(u) ∪ {u}), replace every edge to a larger neighbour v > u by {v, m(u)};
- small-star: with m(u) = min of u and its smaller neighbours, replace every edge to a smaller
  neighbour v < u by {v, m(u)}, and add {u, m(u)}.

Both keep each component connected and pull every node towards its component's smallest id.
The graph is converged when it is a forest of stars around the component minima: every node
either has only larger neighbours (a root) or exactly one neighbour, which is smaller (a leaf
of that root). Each large-star step counts, per partition, the nodes that break this rule;
when none do, every node's root is its one smaller neighbour or itself. Rounds grow with the
logarithm of the component diameters, not with the graph's size.

Node ids are strings compared in code-point order; the root of a component is its smallest id.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from raylm.data.shuffle import map_partitions

EDGE_SCHEMA = pa.schema([("u", pa.string()), ("v", pa.string())])
STEP_SCHEMA = pa.schema([("u", pa.string()), ("v", pa.string()), ("unsettled", pa.int64())])
COMPONENT_SCHEMA = pa.schema([("id", pa.string()), ("root", pa.string())])


def _both_directions(u: pa.Array, v: pa.Array) -> pa.Table:
    return pa.table({"u": pa.concat_arrays([u, v]), "v": pa.concat_arrays([v, u])}, schema=EDGE_SCHEMA)


def _arr(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _smaller(a, b):
    return pc.if_else(pc.less(a, b), a, b)


def directed_edges(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: undirected edges (columns a, b) as directed rows u -> v both ways, self-loops dropped."""
    batch = batch.filter(pc.not_equal(batch.column("a"), batch.column("b")))
    return _both_directions(_arr(batch.column("a").cast(pa.string())), _arr(batch.column("b").cast(pa.string())))


def _unique_edges(part: pa.Table) -> pa.Table:
    return part.select(["u", "v"]).group_by(["u", "v"]).aggregate([])


def large_star(part: pa.Table) -> pa.Table:
    """One partition of directed edges (u, v) -> the large-star edges, both ways, plus one row counting unsettled nodes."""
    part = _unique_edges(part)
    nbr = part.group_by("u").aggregate([("v", "min"), ("v", "count")])
    u, vmin, degree = nbr.column("u"), nbr.column("v_min"), nbr.column("v_count")
    root_like = pc.greater(vmin, u)
    leaf_like = pc.and_(pc.equal(degree, 1), pc.less(vmin, u))
    unsettled = pc.sum(pc.cast(pc.invert(pc.or_(root_like, leaf_like)), pa.int64())).as_py() or 0
    joined = part.join(pa.table({"u": u, "m": _smaller(vmin, u)}), keys="u")
    up = joined.filter(pc.greater(joined.column("v"), joined.column("u")))
    edges = _both_directions(_arr(up.column("v")), _arr(up.column("m")))
    counts = pa.table({"u": pa.nulls(1, pa.string()), "v": pa.nulls(1, pa.string()), "unsettled": [unsettled]},
                      schema=STEP_SCHEMA)  # fmt: skip
    return pa.concat_tables([edges.append_column("unsettled", pa.nulls(edges.num_rows, pa.int64())), counts])


def small_star(part: pa.Table) -> pa.Table:
    """One partition of directed edges (u, v) -> the small-star edges, both ways."""
    part = _unique_edges(part.filter(pc.is_valid(part.column("u"))))
    down = part.filter(pc.less(part.column("v"), part.column("u")))
    mins = down.group_by("u").aggregate([("v", "min")]).rename_columns(["u", "m"])
    joined = down.join(mins, keys="u")
    moved = joined.filter(pc.not_equal(joined.column("v"), joined.column("m")))
    a = pa.concat_arrays([_arr(moved.column("v")), _arr(mins.column("u"))])
    b = pa.concat_arrays([_arr(moved.column("m")), _arr(mins.column("m"))])
    return _both_directions(a, b)


def star_roots(part: pa.Table) -> pa.Table:
    """One partition of a converged star forest -> (id, root) for each of its nodes."""
    nbr = _unique_edges(part).group_by("u").aggregate([("v", "min")])
    u, vmin = nbr.column("u"), nbr.column("v_min")
    return pa.table({"id": u, "root": _smaller(vmin, u)}, schema=COMPONENT_SCHEMA)


def connected_components(edges, num_partitions: int, max_iterations: int = 64):
    """(Ray Dataset of id, root for every node of `edges`, stats) for a Dataset of undirected edges `a`, `b`.

    `root` is the smallest id of the node's component. Raises RuntimeError if the graph has not
    converged after `max_iterations` rounds (it converges in O(log² n) rounds at worst).
    """
    graph = edges.map_batches(directed_edges, batch_format="pyarrow").materialize()
    edges_in = graph.count() // 2
    for iteration in range(1, max_iterations + 1):
        step = map_partitions(graph, "u", num_partitions, large_star, schema=EDGE_SCHEMA).materialize()
        unsettled = int(step.sum("unsettled") or 0)
        if unsettled == 0:
            comps = map_partitions(graph, "u", num_partitions, star_roots, schema=EDGE_SCHEMA).materialize()
            nodes = comps.count()
            components = comps.map_batches(_count_roots, batch_format="pyarrow").sum("roots") if nodes else 0
            return comps, {"iterations": iteration, "edges_in": edges_in, "nodes": nodes,
                           "components": int(components or 0)}  # fmt: skip
        # The count rows (u null) ride along into one partition, where small_star drops them.
        graph = map_partitions(step, "u", num_partitions, small_star, schema=STEP_SCHEMA).materialize()
    raise RuntimeError(f"connected components did not converge in {max_iterations} rounds")


def _count_roots(batch: pa.Table) -> pa.Table:
    roots = pc.sum(pc.cast(pc.equal(batch.column("id"), batch.column("root")), pa.int64())).as_py() or 0
    return pa.table({"roots": [roots]})


def union_find_components(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Reference for tests: node -> smallest id of its component, by a single-machine union-find."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in list(parent)}
