"""Fuzzy deduplication on Ray Data: MinHash + LSH candidates, verified by real Jaccard, clustered by connected components.

    documents (id, text)
      -> band keys: MinHash signature per document, one row per (band key, id)        [map_batches]
      -> candidate pairs: ids sharing a band key                                     [shuffle by band key]
      -> attach text of a, drop repeated pairs                                        [co-group by a]
      -> attach text of b, exact Jaccard of the two shingle sets                      [co-group by b]
      -> verified edges (Jaccard >= threshold) -> connected components              [large/small-star rounds]
      -> every document of a component but its smallest id is a duplicate

No step pulls the corpus, the pairs or the graph onto one node: each is a hash-partitioned
shuffle whose partitions are processed with vectorized Arrow/numpy code. Every decision
depends only on document ids and texts, so the removed set is the same for any sharding,
block size or worker count. Verification is what keeps MinHash's false positives (pairs whose
signatures agree by chance) from removing good documents.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.data.config import FuzzyDedupConfig
from raylm.data.minhash import MinHasher, band_keys, jaccard, lsh_params, shingle_hashes
from raylm.data.shuffle import co_group, map_partitions

DOCS_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
BAND_SCHEMA = pa.schema([("band_key", pa.uint64()), ("id", pa.string())])
PAIRS_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string())])
TEXT_A_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("text_a", pa.string())])
CANDIDATES_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("jaccard", pa.float64())])
"""Every distinct candidate pair (a < b) with its exact Jaccard similarity."""
REMOVED_SCHEMA = pa.schema([("id", pa.string()), ("kept_id", pa.string())])


def lsh_shape(cfg: FuzzyDedupConfig) -> tuple[int, int]:
    """(bands, rows) from the config, or chosen for its threshold and num_perm."""
    if cfg.bands is not None:
        return cfg.bands, cfg.rows
    return lsh_params(cfg.threshold, cfg.num_perm)


@functools.lru_cache(maxsize=4)
def _hasher(num_perm: int, seed: int) -> MinHasher:
    return MinHasher(num_perm, seed)


def band_rows(batch: pa.Table, *, unit: str, ngram: int, num_perm: int, seed: int, bands: int, rows: int) -> pa.Table:
    """Ray Data batch function: (id, text) in, one row (band_key, id) per document and band out.

    A document without shingles (no words) has no bands: it cannot be anyone's near duplicate.
    """
    ids = batch.column("id").combine_chunks()
    shingles = [shingle_hashes(t, unit, ngram) for t in batch.column("text").to_pylist()]
    keep = np.flatnonzero([len(s) > 0 for s in shingles])
    keys = band_keys(_hasher(num_perm, seed).signatures([shingles[i] for i in keep]), bands, rows)
    return pa.table(
        {
            "band_key": pa.array(keys.reshape(-1), pa.uint64()),
            "id": ids.take(pa.array(np.repeat(keep, bands), pa.int64())),
        },
        schema=BAND_SCHEMA,
    )


def bucket_pairs(part: pa.Table, *, max_all_pairs: int, anchors: int) -> pa.Table:
    """Candidate pairs (a < b) of one partition of band rows: documents that share a band key.

    A bucket of up to `max_all_pairs` documents yields all its pairs; a larger one (a text
    repeated thousands of times, boilerplate) pairs each member with the bucket's first
    `anchors` ids, which keeps the work linear in the bucket's size and still links it.
    """
    part = part.sort_by([("band_key", "ascending"), ("id", "ascending")])
    keys = part.column("band_key").to_numpy()
    ids = part.column("id").to_pylist()
    n = len(keys)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if n else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], n]
    a, b = [], []
    for s, e in zip(starts.tolist(), ends.tolist()):
        size = e - s
        if size < 2:
            continue
        heads = size if size <= max_all_pairs else min(anchors, size)
        for i in range(s, s + heads):
            for j in range(i + 1, e):
                if ids[i] != ids[j]:
                    a.append(ids[i])
                    b.append(ids[j])
    return pa.table({"a": pa.array(a, pa.string()), "b": pa.array(b, pa.string())})


def attach_text_a(pairs: pa.Table, docs: pa.Table) -> pa.Table:
    """Co-group function (partition of `a`): each distinct pair once, with the text of `a`."""
    if pairs.num_rows == 0:
        return TEXT_A_SCHEMA.empty_table()
    pairs = pairs.group_by(["a", "b"]).aggregate([])
    joined = pairs.join(docs, keys="a", right_keys="id", join_type="inner")
    return pa.table({"a": joined["a"], "b": joined["b"], "text_a": joined["text"]}, schema=TEXT_A_SCHEMA)


def verify_pairs(pairs: pa.Table, docs: pa.Table, *, unit: str, ngram: int) -> pa.Table:
    """Co-group function (partition of `b`): each pair with the exact Jaccard similarity of its shingle sets."""
    if pairs.num_rows == 0:
        return CANDIDATES_SCHEMA.empty_table()
    joined = pairs.join(docs, keys="b", right_keys="id", join_type="inner")
    shingles_b: dict[str, np.ndarray] = {}
    scores = []
    for text_a, b, text_b in zip(
        joined["text_a"].to_pylist(), joined["b"].to_pylist(), joined["text"].to_pylist()
    ):  # fmt: skip
        if b not in shingles_b:
            shingles_b[b] = shingle_hashes(text_b, unit, ngram)
        scores.append(jaccard(shingle_hashes(text_a, unit, ngram), shingles_b[b]))
    return pa.table({"a": joined["a"], "b": joined["b"], "jaccard": pa.array(scores, pa.float64())},
                    schema=CANDIDATES_SCHEMA)  # fmt: skip


def candidate_pairs(docs, cfg: FuzzyDedupConfig, num_partitions: int):
    """The Ray Dataset of every distinct candidate pair of `docs` (id, text) with its exact Jaccard (CANDIDATES_SCHEMA)."""
    bands, rows = lsh_shape(cfg)
    banded = docs.map_batches(
        band_rows,
        batch_format="pyarrow",
        fn_kwargs=dict(unit=cfg.unit, ngram=cfg.ngram, num_perm=cfg.num_perm, seed=cfg.seed, bands=bands, rows=rows),
    )
    pairs = map_partitions(banded, "band_key", num_partitions, bucket_pairs, schema=BAND_SCHEMA,
                           max_all_pairs=cfg.max_bucket_all_pairs, anchors=cfg.bucket_anchors)  # fmt: skip
    with_a = co_group(pairs, docs, "a", "id", PAIRS_SCHEMA, DOCS_SCHEMA, num_partitions, attach_text_a)
    return co_group(with_a, docs, "b", "id", TEXT_A_SCHEMA, DOCS_SCHEMA, num_partitions, verify_pairs,
                    unit=cfg.unit, ngram=cfg.ngram)  # fmt: skip


def drop_removed(docs: pa.Table, removed: pa.Table) -> pa.Table:
    """Co-group function (partition of `id`): the documents whose id is not in `removed`."""
    if removed.num_rows == 0:
        return docs
    return docs.filter(pc.invert(pc.is_in(docs.column("id"), value_set=removed.column("id").combine_chunks())))


def remove_duplicates(docs, docs_schema: pa.Schema, removed, num_partitions: int):
    """`docs` without the rows whose id is in `removed` (REMOVED_SCHEMA): a distributed anti-join."""
    return co_group(docs, removed, "id", "id", docs_schema, REMOVED_SCHEMA, num_partitions, drop_removed)
