"""The packed token shard format, version 1: what tokenize writes and train, distill and evaluate read.

    <tokens>/tokenizer.json        the tokenizer that produced the ids
    <tokens>/manifest.json         stage manifest; its "stats" hold the TokenMeta fields below
    <tokens>/train/*.parquet       one row per training sequence
    <tokens>/validation/*.parquet

Each row has one column, `tokens`: a fixed-size list of `seq_len + 1` token ids, stored in
the smallest unsigned integer type that holds the vocabulary (uint16 below 65,536 ids).
Row i+1 starts with the last token of row i, so inputs are row[:-1], targets row[1:],
and no token is lost as a target at a row boundary. Documents are joined with the
end-of-text token before packing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylm.artifacts import require_stage_output
from raylm.errors import InputError

FORMAT_VERSION = 1
COLUMN = "tokens"
SPLITS = ("train", "validation")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type holding ids below vocab_size."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise ValueError(f"vocab_size {vocab_size} does not fit in 32 bits")


@dataclass(frozen=True)
class TokenMeta:
    path: Path
    vocab_size: int
    seq_len: int
    eos_token_id: int
    dtype: str
    num_sequences: dict[str, int]
    format_version: int = FORMAT_VERSION

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    def split_dir(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.path / split

    def to_stats(self) -> dict:
        return {
            "format_version": self.format_version,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "eos_token_id": self.eos_token_id,
            "dtype": self.dtype,
            "num_sequences": dict(self.num_sequences),
        }


def read_token_meta(path: str | os.PathLike) -> TokenMeta:
    """Metadata of a finished tokenize output, or an InputError naming what is wrong."""
    manifest = require_stage_output(path, "tokenize")
    stats = manifest.get("stats") or {}
    version = stats.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: token shard format {version!r}, this raylm reads {FORMAT_VERSION}")
    return TokenMeta(
        path=Path(path),
        vocab_size=int(stats["vocab_size"]),
        seq_len=int(stats["seq_len"]),
        eos_token_id=int(stats["eos_token_id"]),
        dtype=str(stats["dtype"]),
        num_sequences={k: int(v) for k, v in stats["num_sequences"].items()},
    )


def sequences_table(sequences: np.ndarray) -> pa.Table:
    """(N, seq_len + 1) integer array -> a table with one fixed-size-list column `tokens`."""
    n, width = sequences.shape
    flat = pa.array(np.ascontiguousarray(sequences).reshape(-1))
    return pa.table({COLUMN: pa.FixedSizeListArray.from_arrays(flat, width)})


def write_token_shard(path: str | os.PathLike, sequences: np.ndarray) -> None:
    """Write one shard of packed sequences as Parquet."""
    pq.write_table(sequences_table(sequences), str(path))


def read_split_numpy(meta: TokenMeta, split: str, max_rows: int | None = None) -> np.ndarray:
    """A split's sequences as an (N, seq_len + 1) int64 array, for evaluation and tests (not for training ingest)."""
    files = sorted(meta.split_dir(split).glob("*.parquet"))
    rows, total = [], 0
    for f in files:
        col = pq.read_table(f, columns=[COLUMN]).column(COLUMN).combine_chunks()
        arr = col.flatten().to_numpy().reshape(-1, meta.seq_len + 1)
        rows.append(arr)
        total += len(arr)
        if max_rows is not None and total >= max_rows:
            break
    if not rows:
        return np.zeros((0, meta.seq_len + 1), dtype=np.int64)
    out = np.concatenate(rows).astype(np.int64)
    return out[:max_rows] if max_rows is not None else out
