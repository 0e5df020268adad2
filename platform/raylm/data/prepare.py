"""The prepare stage: raw shards in, clean, filtered, deduplicated train/validation Parquet out (Ray Data).

    read (one task per shard) -> clean + tag drop reason -> [materialize] -> count per reason
      -> keep -> exact dedup (global groupby on the text hash) -> split -> sort by hash
      -> [materialize] -> count per split -> write train/*.parquet, validation/*.parquet

Output, written atomically through `stage_output`:

    <output>/train/part-*.parquet        columns id, text
    <output>/validation/part-*.parquet   columns id, text
    <output>/stats.json                  documents and bytes after each step (also in manifest.json)

Rows are ordered by the hash of their text: a fixed pseudo-random order that does not depend
on the input's sharding. The kept set does not either: the same documents give the same ids
whether they come in one shard or many (when ids come from `id_field`).
"""

from __future__ import annotations

import glob
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider
from ray.data.expressions import col
from ray.exceptions import RayTaskError

from raylm.artifacts import stage_output
from raylm.config import RaylmConfig
from raylm.data.clean import KEPT, clean_batch
from raylm.data.config import PrepareConfig
from raylm.data.dedup_exact import dedup_exact
from raylm.data.readers import InputFile, list_input_files, read_shards_batch, resolve_input
from raylm.data.split import SPLITS, add_split
from raylm.data.stats import build_stats, count_by_reason, count_by_split
from raylm.errors import InputError
from raylm.runtime import init_ray

STATS_FILE = "stats.json"
OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
_DEDUP_BYTES_PER_PARTITION = 128 * 2**20
_MAX_DEDUP_PARTITIONS = 256


def run_prepare(cfg: RaylmConfig) -> dict:
    """Run the prepare stage for `cfg.prepare`; a finished output with the same config and input is reused.

    Returns {"output", "reused", "stats"}; raises InputError (one line: file, line) on bad input.
    """
    pcfg: PrepareConfig = cfg.prepare
    files = list_input_files(pcfg.input)
    with stage_output(pcfg.output, "prepare", pcfg, inputs=_fingerprint_paths(pcfg.input, files),
                      overwrite=cfg.run.overwrite) as out:  # fmt: skip
        if out.done:
            return {"output": str(out.path), "reused": True, "stats": out.manifest.get("stats", {})}
        if not ray.is_initialized():
            init_ray(cfg.ray.address, cfg.ray.num_cpus)
        stats = prepare_to(pcfg, files, str(out.tmp))
        (out.tmp / STATS_FILE).write_text(json.dumps(stats, indent=2))
        out.stats = stats
    return {"output": str(out.path), "reused": False, "stats": stats}


def prepare_to(cfg: PrepareConfig, files: list[InputFile], out_dir: str) -> dict:
    """Read `files`, clean, filter, dedup, split and write the Parquet splits under `out_dir`; return the stats."""
    with _input_errors():
        # Materialized once: both the counts and the dedup shuffle consume it, and reading and
        # cleaning twice would cost more than holding it (Ray spills to disk past the object store).
        tagged = clean_documents(read_documents(files, cfg), cfg).materialize()
        by_reason = _sum_rows(tagged.map_batches(count_by_reason, batch_size=None, batch_format="pyarrow"))
        if KEPT not in by_reason:
            raise InputError(
                f"{cfg.input}: no document passes the filters "
                f"(prepare.min_chars={cfg.min_chars}, prepare.min_words={cfg.min_words})"
            )
        kept = tagged.filter(expr=col("reason") == KEPT).select_columns(["id", "text", "bytes"])
        deduped = (
            dedup_exact(kept, cfg.dedup_partitions or _default_partitions(files))
            .map_batches(
                add_split,
                batch_format="pyarrow",
                fn_kwargs={"seed": cfg.split_seed, "validation_fraction": cfg.validation_fraction},
            )
            .sort("hash")
            .materialize()
        )
        by_split = _sum_rows(deduped.map_batches(count_by_split, batch_size=None, batch_format="pyarrow"))
        for split in SPLITS:
            write_split(deduped, split, f"{out_dir}/{split}", cfg.docs_per_output_file)
    return build_stats(len(files), by_reason, by_split)


def read_documents(files: list[InputFile], cfg: PrepareConfig):
    """A Ray Dataset of `id`, `text`: one read task per shard, streaming blocks of `read_batch_docs`."""
    listing = ray.data.from_items([asdict(f) for f in files], override_num_blocks=len(files))
    return listing.map_batches(
        read_shards_batch,
        batch_size=1,
        fn_kwargs={"text_field": cfg.text_field, "id_field": cfg.id_field, "batch_rows": cfg.read_batch_docs},
    )


def clean_documents(ds, cfg: PrepareConfig):
    """Clean every text and tag it with its drop reason (see `clean_batch`)."""
    return ds.map_batches(
        clean_batch, batch_format="pyarrow", fn_kwargs={"min_chars": cfg.min_chars, "min_words": cfg.min_words}
    )


def write_split(ds, split: str, path: str, docs_per_file: int) -> None:
    """Write the rows of one split as `part-*.parquet` (id, text); an empty split gets one empty file."""
    rows = ds.filter(expr=col("split") == split).select_columns(["id", "text"])
    # The directory is ours (inside the stage's temporary output), so "overwrite" is safe; it lets
    # the file names be plain part numbers instead of carrying the write id.
    rows.write_parquet(path, filename_provider=_PartFiles(), min_rows_per_file=docs_per_file, mode="overwrite")
    os.makedirs(path, exist_ok=True)
    if not any(name.endswith(".parquet") for name in os.listdir(path)):
        pq.write_table(OUTPUT_SCHEMA.empty_table(), f"{path}/part-00000.parquet")


def _sum_rows(ds) -> dict[str, dict]:
    """Sum the per-block count rows of `count_by_*` by key, on the driver (a few rows per block)."""
    sums: dict[str, dict] = {}
    for row in ds.take_all():
        acc = sums.setdefault(row["key"], {})
        for field, value in row.items():
            if field != "key":
                acc[field] = acc.get(field, 0) + int(value)
    return sums


def _default_partitions(files: list[InputFile]) -> int:
    total = sum(f.size_bytes for f in files)
    return max(1, min(_MAX_DEDUP_PARTITIONS, math.ceil(total / _DEDUP_BYTES_PER_PARTITION)))


def _fingerprint_paths(spec: str, files: list[InputFile]) -> list[str]:
    """What the manifest fingerprints: the input directory or file, or each file a glob matched."""
    path = resolve_input(spec)
    return [f.path for f in files] if glob.has_magic(path) else [path]


class _PartFiles(FilenameProvider):
    """Output file names `part-00000.parquet`, numbered by write task."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.parquet"


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
