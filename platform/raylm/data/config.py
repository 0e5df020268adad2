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
