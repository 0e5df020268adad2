"""Write the prepare stage's Ray Datasets as directories of numbered files, and read its checkpoints back.

    <dir>/part-00000.parquet, part-00001.parquet, ...    one file per write task, its rows in block order
    <dir>/part-00000.jsonl, ...                          the quarantine

File names are plain part numbers (no write id), so the same input gives the same files on
every run. Every directory written here is the stage's own (a step's checkpoint or the stage's
temporary output), so writing over what is there is safe.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import SaveMode
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink, FilenameProvider
from ray.data.expressions import col

from raylm import storage
from raylm.data.split import SPLITS

OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
"""The columns of a split's files."""


def write_parquet_dir(ds, path: str, schema: pa.Schema, min_rows_per_file: int | None = None) -> None:
    """Write a dataset as `part-*.parquet` under `path`; an empty one gets one empty file of `schema`."""
    ds.write_datasink(ParquetFiles(path, schema, min_rows_per_file), ray_remote_args=storage.task_env(path))
    if not any(f.name.endswith(".parquet") for f in storage.list_files(path)):
        with storage.open_output(storage.join(path, "part-00000.parquet")) as f:
            pq.write_table(schema.empty_table(), f)


def read_parquet_dir(path: str, schema: pa.Schema):
    """A directory written by `write_parquet_dir` as a Ray Dataset, with its schema as written."""
    return ray.data.read_parquet(path, schema=schema, ray_remote_args=storage.task_env(path))


def write_split(ds, split: str, path: str, docs_per_file: int) -> None:
    """Write the rows of one split as `part-*.parquet` (id, text); an empty split gets one empty file."""
    rows = ds.filter(expr=col("split") == split).select_columns(["id", "text"])
    write_parquet_dir(rows, path, OUTPUT_SCHEMA, min_rows_per_file=docs_per_file)


def write_splits(ds, out_dir: str, docs_per_file: int) -> None:
    """Write every split of `ds` (column `split`) under `out_dir/<split>`, its files in the order of `ds`'s blocks."""
    # Ray Data may reorder blocks for speed; kept in order, the files are the same every run. Set on the dataset's
    # own DataContext, which its writes use: a change to the process's context would not reach a dataset made before.
    ds.context.execution_options.preserve_order = True
    for split in SPLITS:
        write_split(ds, split, f"{out_dir}/{split}", docs_per_file)


def write_quarantine(documents, path: str) -> None:
    """Write the bad records among `documents` (reason `quarantined`) as `part-*.jsonl`: id, error_kind, error, text."""
    bad = documents.filter(expr=col("reason") == "quarantined").select_columns(["id", "error_kind", "error", "text"])
    storage.make_dirs(path)
    bad.write_json(path, filename_provider=_PartFiles("jsonl"), mode="overwrite", ray_remote_args=storage.task_env(path))


class ParquetFiles(BlockBasedFileDatasink):
    """Parquet files of `schema`, one per write task, each holding its task's blocks in their order.

    Ray's own parquet sink hands a task's blocks to pyarrow's multi-threaded dataset writer, which
    writes them in whatever order its threads finish: a file that should hold sorted partitions
    0, 1, 2, 3 could hold 2, 0, 3, 1. Here the blocks are joined in order and written as one table.
    """

    def __init__(self, path: str, schema: pa.Schema, min_rows_per_file: int | None = None):
        # The directory is ours (a step's or the stage's temporary output), so "overwrite" is safe; it
        # lets the file names be plain part numbers instead of carrying the write id.
        super().__init__(path, min_rows_per_file=min_rows_per_file, filename_provider=_PartFiles("parquet"),
                         file_format="parquet", mode=SaveMode.OVERWRITE)  # fmt: skip
        self.schema = schema

    def write(self, blocks, ctx) -> None:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table.select(self.schema.names).cast(self.schema) for table in tables if table.num_rows]
        if tables:  # a task given only empty blocks writes no file
            self.write_block(BlockAccessor.for_block(pa.concat_tables(tables)), 0, ctx)

    def write_block_to_file(self, block: BlockAccessor, file) -> None:
        pq.write_table(block.to_arrow(), file)


class _PartFiles(FilenameProvider):
    """Output file names `part-00000.<suffix>`, numbered by write task."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.{self.suffix}"
