"""Config of the prepare stage."""

from pydantic import Field

from raylm.configbase import ConfigSection


class PrepareConfig(ConfigSection):
    input: str
    """Raw shards: a directory, a glob or a file (JSONL, JSONL.gz, Parquet). `package:demo_corpus` is the bundled corpus."""
    output: str
    """Directory for the cleaned, deduplicated Parquet shards (train/ and validation/) and stats.json."""
    text_field: str = "text"
    """Field holding each document's text."""
    id_field: str | None = None
    """Field holding a document id; without one the id is `<file name>:<line or row>`."""
    min_chars: int = Field(100, ge=0)
    """Documents shorter than this many characters (after cleaning) are dropped."""
    min_words: int = Field(10, ge=0)
    """Documents with fewer whitespace-separated words than this are dropped."""
    validation_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    """Share of documents routed to the validation split, by a hash of their text."""
    split_seed: int = 0
    """Salt of the split hash: change it for a different, still deterministic, split."""
    read_batch_docs: int = Field(2048, ge=1)
    """Documents per block that a reader task emits (bounds a task's memory on large shards)."""
    dedup_partitions: int | None = Field(None, ge=1)
    """Hash partitions of the global exact-dedup shuffle; unset: one per 128 MiB of input files, at most 256."""
    docs_per_output_file: int = Field(50_000, ge=1)
    """Documents per output Parquet file, at least (the last file of a split may have fewer)."""
