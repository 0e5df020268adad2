"""The prepare stage: raw shards in; clean, filtered, deduplicated train/validation Parquet out (Ray Data).

    documents  read (one task per shard, streamed) -> clean -> quality filters      [checkpoint]
    exact      global exact dedup on the cleaned-text hash                        [checkpoint]
    fuzzy      MinHash + LSH candidates -> verified by real Jaccard               [checkpoint]
               -> connected components of the verified pairs                      [checkpoint]
    output     drop duplicates -> split by text hash -> sort by text hash -> write

Output, written atomically through `stage_output` (manifest.json is the completion marker):

    <output>/train/part-*.parquet, validation/part-*.parquet   columns id, text
    <output>/quarantine/*.jsonl          bad records with file:line and why (on_error: quarantine)
    <output>/duplicates/exact/*.parquet  every removed exact copy: id, kept_id
    <output>/duplicates/fuzzy/*.parquet  every removed near duplicate: id, kept_id (its cluster's smallest id)
    <output>/stats.json, report.md       documents, bytes, tokens per step and filter; clusters; quarantine

The steps are wired here; raylm.data.sources lists the shards, raylm.data.readers reads them,
raylm.data.writers writes the outputs, and raylm.data.stats makes the figures and the report.

Output and checkpoints may live on a disk or an object store (raylm.storage): Ray Data's tasks
write the Parquet files where they run, and the driver writes only the small files.

Resumable: each step writes its result as Parquet under `<output>.work/` and marks it done;
a run that was killed and started again with the same config and input skips the finished
steps. Every step is deterministic, so the output is the same as an uninterrupted run's.
Rows are ordered by the hash of their text, and the kept set depends on ids and texts only:
the same documents give the same output whether they come as one shard or many.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import pyarrow as pa
from ray.data.expressions import col
from ray.exceptions import RayTaskError

from raylm import storage
from raylm.artifacts import fingerprint, stage_output
from raylm.context import RunContext
from raylm.data import stats as st
from raylm.data.clean import clean_batch
from raylm.data.components import COMPONENT_SCHEMA, connected_components
from raylm.data.config import PrepareConfig
from raylm.data.dedup_exact import EXACT_SCHEMA, add_text_hash, dedup_exact
from raylm.data.dedup_fuzzy import CANDIDATES_SCHEMA, REMOVED_SCHEMA, candidate_pairs, lsh_shape, remove_duplicates
from raylm.data.readers import read_documents
from raylm.data.shuffle import GROUPING_SHUFFLE, map_partitions
from raylm.data.sources import InputFile, input_fingerprints, list_input_files
from raylm.data.split import add_split
from raylm.data.writers import read_parquet_dir, write_parquet_dir, write_quarantine, write_splits
from raylm.errors import InputError

logger = logging.getLogger(__name__)

STATS_FILE = "stats.json"
REPORT_FILE = "report.md"
DOCUMENT_SCHEMA = pa.schema(
    [("id", pa.string()), ("text", pa.string()), ("raw_bytes", pa.int64()), ("bytes", pa.int64()),
     ("reason", pa.string()), ("error_kind", pa.string()), ("error", pa.string())]
    + [(f"pii_{k}", pa.int64()) for k in st.PII_KINDS]
)  # fmt: skip
"""The documents step: every record read, cleaned and tagged with why it is dropped (`reason`), if it is."""
DOCS_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("bytes", pa.int64())])
"""The documents that go on to dedup and the split."""
_BYTES_PER_PARTITION = 128 * 2**20
_MIN_PARTITIONS, _MAX_PARTITIONS = 4, 256


def run_prepare(pcfg: PrepareConfig, ctx: RunContext) -> dict:
    """The prepare stage: `pcfg.input` cleaned, filtered, deduplicated and split into `pcfg.output`.

    A finished output with the same config and input is reused. Returns {"output", "reused", "stats"};
    raises InputError (one line: file, line) on bad input.
    """
    files = list_input_files(pcfg.input, on_error=pcfg.on_error)
    prints = input_fingerprints(pcfg.input, files)
    with stage_output(pcfg.output, "prepare", pcfg, overwrite=ctx.overwrite, input_prints=prints) as out:
        if out.done:
            return {"output": out.path, "reused": True, "stats": out.manifest.get("stats", {})}
        work = WorkDir(f"{out.path}.work", fingerprint("prepare", pcfg, prints))
        stats = prepare_to(pcfg, files, out.tmp, work)
        out.write_json(STATS_FILE, stats)
        report = st.format_report(stats)
        out.write_text(REPORT_FILE, report)
        out.stats = stats
    work.remove()
    logger.info("[raylm] prepare finished:\n%s", report)
    return {"output": out.path, "reused": False, "stats": stats}


class WorkDir:
    """Checkpoints of one prepare run: a Parquet directory per finished step, reused when the run restarts.

    A step's directory is written, then a `<step>.done.json` with its figures: a step without its
    marker did not finish, and is written again from scratch. The same on a disk and on an object
    store. Checkpoints of another config or input (another fingerprint) are discarded.
    """

    def __init__(self, path: str, fingerprint: str):
        self.path = path
        stamp = storage.join(path, "FINGERPRINT")
        try:
            stamped = storage.read_text(stamp)
        except FileNotFoundError:
            stamped = None
        if stamped != fingerprint:
            storage.remove(path)
        storage.make_dirs(path)
        storage.write_text(stamp, fingerprint)
        self.resumed: list[str] = []

    def step(self, name: str, schema: pa.Schema, build: Callable[[], object], measure: Callable[[object], dict]):
        """The Ray Dataset of step `name` and its figures: read back if finished, else built, written and measured."""
        marker = storage.join(self.path, f"{name}.done.json")
        target = storage.join(self.path, name)
        if storage.is_file(marker):
            self.resumed.append(name)
            logger.info("[raylm] prepare: step %s already done, reusing %s", name, target)
            return read_parquet_dir(target, schema), json.loads(storage.read_text(marker))
        started = time.time()
        storage.remove(target)  # what a killed run wrote of this step
        # Held in Ray's object store (which spills to disk past its size) for the figures and the
        # next step; the Parquet copy is what a restarted run reads instead of recomputing.
        ds = build().materialize()
        figures = measure(ds)
        write_parquet_dir(ds, target, schema)
        figures["seconds"] = round(time.time() - started, 2)
        storage.write_text(marker, json.dumps(figures))
        logger.info("[raylm] prepare: step %s done in %.1f s", name, figures["seconds"])
        return ds, figures

    def remove(self) -> None:
        storage.remove(self.path)


def prepare_to(cfg: PrepareConfig, files: list[InputFile], out_dir: str, work: WorkDir) -> dict:
    """Read, clean, filter, dedup, split and write `files` under `out_dir`; return the stats."""
    num_parts = cfg.dedup.partitions or default_partitions(files)
    with _input_errors():
        documents, doc_counts = work.step(
            "documents", DOCUMENT_SCHEMA, lambda: clean_documents(read_documents(files, cfg), cfg), _measure_documents
        )
        write_quarantine(documents, f"{out_dir}/quarantine")
        if doc_counts.get("kept", {}).get("documents", 0) == 0:
            raise InputError(f"{cfg.input}: no document passes the filters (see prepare.filters; counts: "
                             f"{ {k: v['documents'] for k, v in doc_counts.items() if k != 'seconds'} })")  # fmt: skip
        docs = documents.filter(expr=col("reason") == "").select_columns(DOCS_SCHEMA.names)

        exact_figures = {"enabled": False}
        if cfg.dedup.exact.enabled:
            exact, exact_figures = work.step("exact", EXACT_SCHEMA, lambda: dedup_exact(docs, num_parts), _measure_exact)
            removed = exact.filter(expr=col("id") != col("kept_id"))
            write_parquet_dir(removed.select_columns(["id", "kept_id"]), f"{out_dir}/duplicates/exact", REMOVED_SCHEMA)
            docs = exact.filter(expr=col("id") == col("kept_id")).select_columns(DOCS_SCHEMA.names)

        fuzzy_figures = {"enabled": False}
        if cfg.dedup.fuzzy.enabled:
            docs, fuzzy_figures = _fuzzy_dedup(docs, cfg, num_parts, work, out_dir)

        started = time.time()
        final = order_by_hash(docs.map_batches(
            add_split,
            batch_format="pyarrow",
            fn_kwargs={"seed": cfg.split_seed, "validation_fraction": cfg.validation_fraction},
        ), num_parts).materialize()  # fmt: skip
        by_split = st.sum_rows(final.map_batches(st.count_split, batch_size=None, batch_format="pyarrow").take_all())
        write_splits(final, out_dir, cfg.docs_per_output_file)
        output_seconds = round(time.time() - started, 2)
    return st.build_stats(len(files), doc_counts, exact_figures, fuzzy_figures, by_split, output_seconds)


def _remove_clusters(docs, candidates, threshold: float, num_parts: int, work: WorkDir, out_dir: str):
    """Cluster the verified pairs, record the removed ids, and drop them: (kept docs, component figures, kept figures)."""
    edges = candidates.filter(expr=col("jaccard") >= threshold).select_columns(["a", "b"])
    cc_stats: dict = {}

    def components():
        comps, found = connected_components(edges, num_parts)
        cc_stats.update(found)
        return comps

    comps, comp_figures = work.step(
        "components", COMPONENT_SCHEMA, components, lambda ds: {**cc_stats, **_measure_components(ds)}
    )
    removed = comps.filter(expr=col("id") != col("root")).select_columns(["id", "root"])
    removed = removed.rename_columns({"root": "kept_id"})
    write_parquet_dir(removed, f"{out_dir}/duplicates/fuzzy", REMOVED_SCHEMA)
    kept, kept_figures = work.step(
        "fuzzy_kept", DOCS_SCHEMA, lambda: remove_duplicates(docs, DOCS_SCHEMA, removed, num_parts), _measure_docs
    )
    return kept, comp_figures, kept_figures


def _fuzzy_dedup(docs, cfg: PrepareConfig, num_parts: int, work: WorkDir, out_dir: str):
    """Near-duplicate removal: candidate pairs verified by Jaccard, then their clusters: (kept docs, figures)."""
    fz = cfg.dedup.fuzzy
    text_docs = docs.select_columns(["id", "text"])
    candidates, cand_figures = work.step(
        "candidates",
        CANDIDATES_SCHEMA,
        lambda: candidate_pairs(text_docs, fz, num_parts),
        lambda ds: st.sum_rows(
            ds.map_batches(st.count_candidates, batch_size=None, batch_format="pyarrow",
                           fn_kwargs={"threshold": fz.threshold}).take_all()  # fmt: skip
        ),
    )
    if cand_figures.get("verified", {}).get("documents", 0) == 0:  # nothing to cluster or remove
        write_parquet_dir(docs.limit(0).select_columns(["id"]), f"{out_dir}/duplicates/fuzzy", REMOVED_SCHEMA)
        comp_figures = {"iterations": 0, "clusters": 0, "cluster_sizes": {}, "seconds": 0.0}
        kept, kept_figures = docs, {**_measure_docs(docs), "seconds": 0.0}
    else:
        kept, comp_figures, kept_figures = _remove_clusters(docs, candidates, fz.threshold, num_parts, work, out_dir)
    bands, rows = lsh_shape(fz)
    figures = {
        "candidates": cand_figures,
        "components": comp_figures,
        "kept": kept_figures,
        "lsh": {"bands": bands, "rows": rows},
        "threshold": fz.threshold,
        "seconds": round(cand_figures["seconds"] + comp_figures["seconds"] + kept_figures["seconds"], 2),
    }
    return kept, figures


def _measure_documents(ds) -> dict:
    return st.sum_rows(ds.map_batches(st.count_documents, batch_size=None, batch_format="pyarrow").take_all())


def _measure_exact(ds) -> dict:
    cols = ["id", "kept_id", "copies", "bytes"]
    return st.sum_rows(ds.select_columns(cols).map_batches(st.count_exact, batch_size=None,
                                                           batch_format="pyarrow").take_all())  # fmt: skip


def _measure_docs(ds) -> dict:
    sizes = ds.select_columns(["bytes"]).sum("bytes")
    return {"documents": ds.count(), "bytes": int(sizes or 0)}


def _measure_components(ds) -> dict:
    """Cluster sizes: each component's node count, summed per root across blocks, then binned."""
    per_root = map_partitions(ds.select_columns(["root"]), "root", 4, st.count_cluster_sizes,
                              schema=pa.schema([("root", pa.string())])).take_all()  # fmt: skip
    sizes: dict[int, int] = {}
    for row in per_root:
        sizes[int(row["size"])] = sizes.get(int(row["size"]), 0) + int(row["clusters"])
    return {"clusters": sum(sizes.values()), "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())}}


def clean_documents(ds, cfg: PrepareConfig):
    """Clean every text and tag it with why it is dropped, if it is (see `clean_batch`)."""
    return ds.map_batches(clean_batch, batch_format="pyarrow", fn_kwargs={"clean": cfg.clean, "filters": cfg.filters})


ORDER_BITS = 60


def _add_order(batch: pa.Table) -> pa.Table:
    """Append `order`: the first 60 bits of the text's hash, as an integer to range-partition on."""
    hashes = add_text_hash(batch).column("hash").to_pylist()
    return batch.append_column("order", pa.array([int(h[:15], 16) for h in hashes], pa.int64()))


def order_by_hash(ds, num_partitions: int):
    """The rows sorted by the hash of their text (then id): an order that depends only on the documents.

    Range partitions are cut at fixed points of the hash space (uniform), so the sort needs no sampling.
    """
    boundaries = [i * (1 << ORDER_BITS) // num_partitions for i in range(1, num_partitions)]
    ordered = ds.map_batches(_add_order, batch_format="pyarrow")
    # Settings of this dataset's DataContext, which the datasets made from it (its materialized copy, the writes)
    # share: the same sort whether or not a step was resumed, and its blocks kept in sorted order (Ray Data hands
    # blocks on as their tasks finish otherwise, and the split files would hold them in that order).
    ordered.context.shuffle_strategy = GROUPING_SHUFFLE
    ordered.context.execution_options.preserve_order = True
    return ordered.sort(["order", "id"], boundaries=boundaries)


def default_partitions(files: list[InputFile]) -> int:
    """One shuffle partition per 128 MiB of input, at least 4 (parallelism), at most 256."""
    total = sum(f.size_bytes for f in files)
    return max(_MIN_PARTITIONS, min(_MAX_PARTITIONS, math.ceil(total / _BYTES_PER_PARTITION)))


@contextmanager
def _input_errors() -> Iterator[None]:
    """Re-raise an InputError from inside a Ray task as itself: one line, no task traceback."""
    try:
        yield
    except Exception as e:
        cause = _find_input_error(e)
        if cause is None or cause is e:
            raise
        # Ray Data appends retry advice to the message on further lines; the error is its first line.
        raise InputError(str(cause).splitlines()[0]) from None


def _find_input_error(e: BaseException | None) -> InputError | None:
    """The InputError behind `e`: a task's error reaches the driver as RayTaskError(<its class>)."""
    for _ in range(20):  # a bound, in case of a cycle in the chain
        if e is None or (isinstance(e, InputError) and not isinstance(e, RayTaskError)):
            return e
        e = e.cause if isinstance(e, RayTaskError) else (e.__cause__ or e.__context__)
    return None
