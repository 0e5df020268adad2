"""Packing token ids into fixed-length rows: pure functions on numpy arrays, no Ray.

A split is one token stream: each document's ids followed by the end-of-text id, in
input order. The stream is cut into rows of `seq_len + 1` ids, row i being
`stream[i * seq_len : i * seq_len + seq_len + 1]`, so row i+1 starts with the last id
of row i and every id after the first is a target exactly once (format v1, shards.py).
Only the tail after the last full row, fewer than `seq_len` ids, is dropped.

The packer works on any chunking of the stream (Ray Data blocks of any size) and gives
the same rows as packing the whole stream at once.
"""

from __future__ import annotations

from itertools import chain
from typing import Iterable, Iterator, Sequence

import numpy as np


def join_documents(docs_ids: Sequence[Sequence[int]], eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Documents' ids -> (stream, offsets): the ids with `eos_id` after each document, and where each starts.

    stream has sum(len(d) + 1) ids; document k with its separator is stream[offsets[k]:offsets[k + 1]].
    """
    lengths = np.fromiter((len(d) + 1 for d in docs_ids), dtype=np.int64, count=len(docs_ids))
    offsets = np.zeros(len(docs_ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # One pass through Python ints: every document's ids, then its separator.
    stream = np.fromiter(chain.from_iterable(chain(d, (eos_id,)) for d in docs_ids), dtype=dtype, count=int(offsets[-1]))
    return stream, offsets


def cut_rows(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, rest): every full row of `stream` as an (n, seq_len + 1) array, and the ids from the last row's end on.

    `rest` starts with the last id of the last row (the next row's first id), or is the whole
    stream when it is shorter than a row.
    """
    width = seq_len + 1
    n = (len(stream) - 1) // seq_len if len(stream) >= width else 0
    if n == 0:
        return np.zeros((0, width), dtype=stream.dtype), stream
    rows = np.lib.stride_tricks.sliding_window_view(stream[: n * seq_len + 1], width)[::seq_len]
    return np.ascontiguousarray(rows), stream[n * seq_len :].copy()


class SequencePacker:
    """Cuts a token stream, fed in chunks of any size, into overlapping rows of `seq_len + 1` ids."""

    def __init__(self, seq_len: int, dtype: np.dtype):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.tokens_in = 0
        self.rows_out = 0
        self._rest = np.zeros(0, dtype=self.dtype)

    def add(self, stream_chunk: np.ndarray) -> np.ndarray:
        """Feed the next ids of the stream; returns the rows completed by them, shape (k, seq_len + 1)."""
        chunk = np.asarray(stream_chunk, dtype=self.dtype)
        self.tokens_in += len(chunk)
        stream = np.concatenate([self._rest, chunk]) if len(self._rest) else chunk
        rows, self._rest = cut_rows(stream, self.seq_len)
        self.rows_out += len(rows)
        return rows

    @property
    def dropped_tokens(self) -> int:
        """Ids of the stream so far that are in no row (the tail shorter than a row)."""
        return len(self._rest) - 1 if self.rows_out else len(self._rest)


class RowBatcher:
    """Regroups rows arriving in chunks of any size into batches of exactly `rows_per_batch` (the last may be short)."""

    def __init__(self, rows_per_batch: int, width: int, dtype: np.dtype):
        if rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be positive, got {rows_per_batch}")
        self.rows_per_batch = rows_per_batch
        self._parts: list[np.ndarray] = []
        self._count = 0
        self._empty = np.zeros((0, width), dtype=dtype)

    def add(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """Take rows; yield every full batch they complete."""
        if len(rows):
            self._parts.append(rows)
            self._count += len(rows)
        while self._count >= self.rows_per_batch:
            pending = np.concatenate(self._parts)
            yield pending[: self.rows_per_batch]
            rest = pending[self.rows_per_batch :]
            self._parts, self._count = ([rest] if len(rest) else []), len(rest)

    def flush(self) -> Iterator[np.ndarray]:
        """Yield the last, short batch, if any rows are left."""
        if self._count:
            yield np.concatenate(self._parts)
            self._parts, self._count = [], 0


def pack_documents(
    docs_ids: Iterable[Sequence[int]], eos_id: int, seq_len: int, dtype: np.dtype = np.dtype(np.int64)
) -> tuple[np.ndarray, int]:
    """All documents at once -> (rows of seq_len + 1 ids, number of dropped tail ids). For tests and small inputs."""
    stream, _ = join_documents(list(docs_ids), eos_id, np.dtype(dtype))
    packer = SequencePacker(seq_len, dtype)
    rows = packer.add(stream)
    return rows, packer.dropped_tokens


def packed_split(docs_ids: Iterable[Sequence[int]], eos_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, document starts) of a whole split at once, as shards.write_token_data takes them (tests, small data)."""
    stream, offsets = join_documents(list(docs_ids), eos_id, np.dtype(np.int64))
    rows, _ = cut_rows(stream, seq_len)
    return rows, offsets[:-1]
