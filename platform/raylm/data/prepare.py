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

Resumable: each step writes its result as Parquet under `<output>.work/` and marks it done;
a run that was killed and started again with the same config and input skips the finished
steps. Every step is deterministic, so the output is the same as an uninterrupted run's.
Rows are ordered by the hash of their text, and the kept set depends on ids and texts only:
the same documents give the same output whether they come as one shard or many.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider
from ray.data.expressions import col
from ray.exceptions import RayTaskError

from raylm.artifacts import fingerprint, fingerprint_inputs, stage_output
from raylm.config import RaylmConfig
from raylm.data import stats as st
from raylm.data.clean import clean_batch
from raylm.data.config import PrepareConfig
from raylm.data.dedup_exact import add_text_hash, dedup_exact
from raylm.data.dedup_fuzzy import REMOVED_SCHEMA, candidate_pairs, lsh_shape, remove_duplicates
from raylm.data.readers import InputFile, is_uri, list_input_files, read_shards_batch, resolve_input
from raylm.data.shuffle import map_partitions
from raylm.data.split import SPLITS, add_split
from raylm.errors import InputError
from raylm.runtime import init_ray

logger = logging.getLogger(__name__)

STATS_FILE = "stats.json"
REPORT_FILE = "report.md"
OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
DOCS_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("bytes", pa.int64())])
_BYTES_PER_PARTITION = 128 * 2**20
_MIN_PARTITIONS, _MAX_PARTITIONS = 4, 256


def run_prepare(cfg: RaylmConfig) -> dict:
    """Run the prepare stage for `cfg.prepare`; a finished output with the same config and input is reused.

    Returns {"output", "reused", "stats"}; raises InputError (one line: file, line) on bad input.
    """
    pcfg: PrepareConfig = cfg.prepare
    files = list_input_files(pcfg.input, on_error=pcfg.on_error)
    prints = input_fingerprints(pcfg.input, files)
    with stage_output(pcfg.output, "prepare", pcfg, overwrite=cfg.run.overwrite, input_prints=prints) as out:
        if out.done:
            return {"output": str(out.path), "reused": True, "stats": out.manifest.get("stats", {})}
        if not ray.is_initialized():
            init_ray(cfg.ray.address, cfg.ray.num_cpus)
        work = WorkDir(Path(f"{pcfg.output}.work"), fingerprint("prepare", pcfg, prints))
        stats = prepare_to(pcfg, files, str(out.tmp), work)
        (out.tmp / STATS_FILE).write_text(json.dumps(stats, indent=2))
        report = st.format_report(stats)
        (out.tmp / REPORT_FILE).write_text(report)
        out.stats = stats
    work.remove()
    logger.info("[raylm] prepare finished:\n%s", report)
    return {"output": str(out.path), "reused": False, "stats": stats}


class WorkDir:
    """Checkpoints of one prepare run: a Parquet directory per finished step, reused when the run restarts.

    A step's directory is written under a temporary name and renamed when complete, then a
    `<step>.done.json` with its figures is written: a step without its marker did not finish.
    Checkpoints of another config or input (another fingerprint) are discarded.
    """

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        stamp = path / "FINGERPRINT"
        if path.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)
        self.resumed: list[str] = []

    def step(self, name: str, schema: pa.Schema, build: Callable[[], object], measure: Callable[[object], dict]):
        """The Ray Dataset of step `name` and its figures: read back if finished, else built, written and measured."""
        marker = self.path / f"{name}.done.json"
        target = self.path / name
        if marker.exists():
            self.resumed.append(name)
            logger.info("[raylm] prepare: step %s already done, reusing %s", name, target)
            return read_step(target, schema), json.loads(marker.read_text())
        started = time.time()
        tmp = self.path / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        # Held in the object store (which spills to disk past its size) for the figures and the
        # next step; the Parquet copy is what a restarted run reads instead of recomputing.
        ds = build().materialize()
        figures = measure(ds)
        write_parquet_dir(ds, str(tmp), schema)
        os.rename(tmp, target)
        figures["seconds"] = round(time.time() - started, 2)
        marker.write_text(json.dumps(figures))
        return ds, figures

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def prepare_to(cfg: PrepareConfig, files: list[InputFile], out_dir: str, work: WorkDir) -> dict:
    """Read, clean, filter, dedup, split and write `files` under `out_dir`; return the stats."""
    num_parts = cfg.dedup.partitions or default_partitions(files)
    with _input_errors():
        documents, doc_counts = work.step(
            "documents", DOCUMENT_SCHEMA, lambda: clean_documents(read_documents(files, cfg), cfg), _measure_documents
        )
        _write_quarantine(documents, f"{out_dir}/quarantine")
        if doc_counts.get("kept", {}).get("documents", 0) == 0:
            raise InputError(f"{cfg.input}: no document passes the filters (see prepare.filters; counts: "
                             f"{ {k: v['documents'] for k, v in doc_counts.items() if k != 'seconds'} })")  # fmt: skip
        docs = documents.filter(expr=col("reason") == "").select_columns(DOCS_SCHEMA.names)

        exact_figures = {"enabled": False}
        if cfg.dedup.exact.enabled:
            from raylm.data.dedup_exact import EXACT_SCHEMA

            exact, exact_figures = work.step(
                "exact", EXACT_SCHEMA, lambda: dedup_exact(docs, num_parts), _measure_exact
            )
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
        with _preserve_order():
            for split in SPLITS:
                write_split(final, split, f"{out_dir}/{split}", cfg.docs_per_output_file)
        output_seconds = round(time.time() - started, 2)
    return build_stats(len(files), doc_counts, exact_figures, fuzzy_figures, by_split, output_seconds)


def _remove_clusters(docs, candidates, threshold: float, num_parts: int, work: WorkDir, out_dir: str):
    """Cluster the verified pairs, record the removed ids, and drop them: (kept docs, component figures, kept figures)."""
    from raylm.data.components import connected_components

    edges = candidates.filter(expr=col("jaccard") >= threshold).select_columns(["a", "b"])
    cc_stats: dict = {}

    def components():
        comps, found = connected_components(edges, num_parts)
        cc_stats.update(found)
        return comps

    comps, comp_figures = work.step(
        "components", COMPONENTS_SCHEMA, components, lambda ds: {**cc_stats, **_measure_components(ds)}
    )
    removed = comps.filter(expr=col("id") != col("root")).select_columns(["id", "root"])
    removed = removed.rename_columns({"root": "kept_id"})
    write_parquet_dir(removed, f"{out_dir}/duplicates/fuzzy", REMOVED_SCHEMA)
    kept, kept_figures = work.step(
        "fuzzy_kept", DOCS_SCHEMA, lambda: remove_duplicates(docs, DOCS_SCHEMA, removed, num_parts), _measure_docs
    )
    return kept, comp_figures, kept_figures


def _fuzzy_dedup(docs, cfg: PrepareConfig, num_parts: int, work: WorkDir, out_dir: str):
    from raylm.data.dedup_fuzzy import CANDIDATES_SCHEMA

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


DOCUMENT_SCHEMA = pa.schema(
    [("id", pa.string()), ("text", pa.string()), ("raw_bytes", pa.int64()), ("bytes", pa.int64()),
     ("reason", pa.string()), ("error_kind", pa.string()), ("error", pa.string())]
    + [(f"pii_{k}", pa.int64()) for k in st.PII_KINDS]
)  # fmt: skip
COMPONENTS_SCHEMA = pa.schema([("id", pa.string()), ("root", pa.string())])


def _measure_documents(ds) -> dict:
    return st.sum_rows(ds.map_batches(st.count_documents, batch_size=None, batch_format="pyarrow").take_all())


def _measure_exact(ds) -> dict:
    cols = ["id", "kept_id", "copies", "bytes"]
    return st.sum_rows(ds.select_columns(cols).map_batches(st.count_exact, batch_size=None,
                                                           batch_format="pyarrow").take_all())  # fmt: skip


def _measure_docs(ds) -> dict:
    sizes = ds.select_columns(["bytes"]).sum("bytes")
    return {"documents": ds.count(), "bytes": int(sizes or 0)}


def _count_roots(block: pa.Table) -> pa.Table:
    grouped = block.group_by("root").aggregate([("root", "count")])
    return pa.table({"key": grouped.column("root"), "size": grouped.column("root_count")})


def _measure_components(ds) -> dict:
    """Cluster sizes: each component's node count, summed per root across blocks, then binned."""
    per_root = map_partitions(ds.select_columns(["root"]), "root", 4, _root_sizes,
                              schema=pa.schema([("root", pa.string())])).take_all()  # fmt: skip
    sizes: dict[int, int] = {}
    for row in per_root:
        sizes[int(row["size"])] = sizes.get(int(row["size"]), 0) + int(row["clusters"])
    return {"clusters": sum(sizes.values()), "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())}}


def _root_sizes(part: pa.Table) -> pa.Table:
    """Of one partition of roots: how many clusters have each size."""
    per_root = part.group_by("root").aggregate([("root", "count")])
    hist = per_root.group_by("root_count").aggregate([("root_count", "count")])
    return pa.table({"size": hist.column(0), "clusters": hist.column(1)})


def build_stats(num_files: int, docs: dict, exact: dict, fuzzy: dict, by_split: dict, output_seconds: float) -> dict:
    """The stats of one run: documents, bytes and tokens out of each step, and what each removed."""
    from raylm.data.filters import FILTER_NAMES

    seconds = {"documents": docs["seconds"]}
    docs = {k: v for k, v in docs.items() if k != "seconds"}
    zero = {"documents": 0, "raw_bytes": 0, "bytes": 0}
    good = {k: v for k, v in docs.items() if not k.startswith("quarantined:")}
    quarantined = {k.split(":", 1)[1]: v["documents"] for k, v in docs.items() if k.startswith("quarantined:")}
    read_docs = sum(v["documents"] for v in good.values())
    read_bytes = sum(v["raw_bytes"] for v in good.values())
    clean_bytes = sum(v["bytes"] for v in good.values())
    kept = docs.get("kept", zero)
    removed = {r: st.volume(docs.get(r, zero)["documents"], docs.get(r, zero)["bytes"]) for r in ("empty", *FILTER_NAMES)}
    stats = {
        "input_files": num_files,
        "read": st.volume(read_docs, read_bytes),
        "quarantined": {"documents": sum(quarantined.values()), "by_kind": dict(sorted(quarantined.items()))},
        "clean": st.volume(read_docs, clean_bytes)
        | {"pii_redacted": {k: sum(v.get(f"pii_{k}", 0) for v in good.values()) for k in st.PII_KINDS}},
        "filter": st.volume(kept["documents"], kept["bytes"])
        | {"removed": removed, "removed_total": st.volume(read_docs - kept["documents"], clean_bytes - kept["bytes"])},
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
        stats["dedup_exact"] = st.volume(kept_docs, kept_bytes) | {
            "removed": st.volume(rem["documents"], rem["bytes"]),
            "clusters": sum(sizes.values()),
            "cluster_sizes": st.size_histogram(sizes),
        }
        seconds["dedup_exact"] = exact["seconds"]
        before = stats["dedup_exact"]
    else:
        stats["dedup_exact"] = {"enabled": False}
    if fuzzy.get("enabled", True):
        cand, comp, kept_f = fuzzy["candidates"], fuzzy["components"], fuzzy["kept"]
        sizes = {int(k): v for k, v in comp.get("cluster_sizes", {}).items()}
        stats["dedup_fuzzy"] = st.volume(kept_f["documents"], kept_f["bytes"]) | {
            "removed": st.volume(before["documents"] - kept_f["documents"], before["bytes"] - kept_f["bytes"]),
            "clusters": comp.get("clusters", 0),
            "cluster_sizes": st.size_histogram(sizes),
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
    stats["split"] = {s: st.volume(by_split.get(s, zero)["documents"], by_split.get(s, zero)["bytes"]) for s in SPLITS}
    stats["seconds"] = seconds | {"split_and_write": output_seconds}
    return stats


def read_documents(files: list[InputFile], cfg: PrepareConfig):
    """A Ray Dataset of documents and bad records: one read task per shard, streaming blocks of `read_batch_docs`."""
    listing = ray.data.from_items([asdict(f) for f in files], override_num_blocks=len(files))
    credentials = storage_credentials() if any(is_uri(f.path) for f in files) else {}
    return listing.map_batches(
        read_shards_batch,
        batch_size=1,
        **({"runtime_env": {"env_vars": credentials}} if credentials else {}),
        fn_kwargs={
            "text_field": cfg.text_field,
            "id_field": cfg.id_field,
            "batch_rows": cfg.read_batch_docs,
            "txt_documents": cfg.txt_documents,
            "on_error": cfg.on_error,
        },
    )


CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_STORAGE_")


def storage_credentials() -> dict[str, str]:
    """The object-store settings of this process's environment (AWS_*, GOOGLE_*, GCS_*, AZURE_STORAGE_*).

    Read tasks run in Ray workers, whose environment is the cluster's; the settings the user
    has where they start the stage go with the tasks, as they would for a local read.
    """
    return {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_PREFIXES)}


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
    return ds.map_batches(_add_order, batch_format="pyarrow").sort(["order", "id"], boundaries=boundaries)


@contextmanager
def _preserve_order() -> Iterator[None]:
    """Make Ray Data keep block order (it may reorder blocks for speed), so output files are the same every run."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = before


def _write_quarantine(documents, path: str) -> None:
    bad = documents.filter(expr=col("reason") == "quarantined").select_columns(["id", "error_kind", "error", "text"])
    os.makedirs(path, exist_ok=True)
    bad.write_json(path, filename_provider=_PartFiles("jsonl"), mode="overwrite")


def write_split(ds, split: str, path: str, docs_per_file: int) -> None:
    """Write the rows of one split as `part-*.parquet` (id, text); an empty split gets one empty file."""
    rows = ds.filter(expr=col("split") == split).select_columns(["id", "text"])
    write_parquet_dir(rows, path, OUTPUT_SCHEMA, min_rows_per_file=docs_per_file)


def write_parquet_dir(ds, path: str, schema: pa.Schema, **kwargs) -> None:
    """Write a dataset as `part-*.parquet` under `path`; an empty one gets one empty file of `schema`."""
    # The directory is ours (a step's or the stage's temporary output), so "overwrite" is safe; it
    # lets the file names be plain part numbers instead of carrying the write id.
    ds.write_parquet(path, filename_provider=_PartFiles("parquet"), mode="overwrite", **kwargs)
    os.makedirs(path, exist_ok=True)
    if not any(name.endswith(".parquet") for name in os.listdir(path)):
        pq.write_table(schema.empty_table(), f"{path}/part-00000.parquet")


def read_step(path: Path, schema: pa.Schema):
    """A step's Parquet directory as a Ray Dataset, with its schema as written."""
    return ray.data.read_parquet(str(path), schema=schema)


def default_partitions(files: list[InputFile]) -> int:
    """One shuffle partition per 128 MiB of input, at least 4 (parallelism), at most 256."""
    total = sum(f.size_bytes for f in files)
    return max(_MIN_PARTITIONS, min(_MAX_PARTITIONS, math.ceil(total / _BYTES_PER_PARTITION)))


def input_fingerprints(spec: str, files: list[InputFile]) -> dict[str, str]:
    """The manifest's fingerprint of the input: of the local directory or file, or of the listed shards' names, sizes and times."""
    path = resolve_input(spec)
    if not glob.has_magic(path) and not is_uri(path):
        return fingerprint_inputs([path])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{f.size_bytes}:{f.mtime_ns}\n".encode())
    return {spec: h.hexdigest()}


class _PartFiles(FilenameProvider):
    """Output file names `part-00000.<suffix>`, numbered by write task."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.{self.suffix}"


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
