"""Packing on the workers: token shards written to storage by Ray tasks, the same bytes one sequential packer writes.

    encoded blocks (object store) ──_block_layout task──▶ driver: tokens per piece, which pieces end a document
    driver: each split's stream as segments (block, pieces lo..hi, first token), document starts
    ──_write_shard task, once the stream holds a shard's last token──▶ <output>/<split>/part-NNNNN.npy

Row r of a split is its stream's tokens [r * seq_len, r * seq_len + seq_len + 1), whoever cuts it, and shard k holds
rows [k * shard_rows, (k + 1) * shard_rows): a task that gathers exactly those tokens from the blocks that hold them
writes the bytes the sequential packer (packing.SequencePacker + RowBatcher) would. The driver handles a few numbers
per document, never the tokens; the blocks stay in Ray's object store until the shards that need them are written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from raylm import storage
from raylm.tokenize.encode import IDS_COLUMN, LAST_COLUMN, block_stream
from raylm.tokenize.packing import cut_rows
from raylm.tokenize.shards import DOC_STARTS_DIR, shard_name

HELPER_CPUS = 0.25  # the layout and shard tasks move bytes; the encoding actors hold the real CPUs
SHARDS_IN_FLIGHT = 4  # shard writes pending at once (each pins the blocks it reads)


def _block_layout(block: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of each piece, whether each piece ends its document) of an encoded block."""
    offsets = block.column(IDS_COLUMN).combine_chunks().offsets.to_numpy()
    last = block.column(LAST_COLUMN).to_numpy(zero_copy_only=False).astype(bool)
    return np.diff(offsets).astype(np.int64), last


def _write_shard(path: str, segments: list, skip: int, rows: int, seq_len: int, dtype: str) -> None:
    """Cut `rows` rows from the stream that `segments` (block ref, first piece, end piece) hold, starting `skip`
    tokens into it, and write them to `path` as .npy."""
    blocks = ray.get([ref for ref, _, _ in segments])
    stream = np.concatenate([block_stream(b.slice(lo, hi - lo)) for b, (_, lo, hi) in zip(blocks, segments)])
    window = stream[skip : skip + rows * seq_len + 1].astype(np.dtype(dtype), copy=False)
    cut, _ = cut_rows(window, seq_len)
    if len(cut) != rows:  # the driver's bookkeeping and the blocks disagree: never write a wrong shard
        raise RuntimeError(f"{path}: {len(cut)} rows cut where {rows} were laid out")
    with storage.open_output(path) as f:
        np.save(f, cut, allow_pickle=False)


@dataclass
class _Segment:
    ref: ray.ObjectRef
    lo: int
    hi: int
    start: int  # its first token's position in the split's stream
    tokens: int


class SplitShards:
    """One split's stream, laid out on the driver; its shards written by tasks as soon as their tokens exist."""

    def __init__(self, location: str, split: str, num_docs: int, seq_len: int, shard_rows: int, dtype: np.dtype):
        self.location, self.split = location, split
        self.seq_len, self.shard_rows, self.dtype = seq_len, shard_rows, np.dtype(dtype)
        self.starts = np.zeros(num_docs, dtype=np.int64)  # every document's start in the stream
        self.tokens = self.documents = self.pieces = self.shards = 0
        self._next_start = 0
        self._segments: deque[_Segment] = deque()
        self._pending: list[ray.ObjectRef] = []
        self._write = ray.remote(_write_shard).options(num_cpus=HELPER_CPUS, max_retries=3,
                                                       **storage.task_env(location))  # fmt: skip

    def add(self, ref: ray.ObjectRef, lengths: np.ndarray, last: np.ndarray, lo: int, hi: int) -> None:
        """Append pieces lo..hi of the block `ref` (their token counts and document ends) to the stream."""
        ends = self.tokens + np.cumsum(lengths[lo:hi])[last[lo:hi]]  # just after each document ending here
        if len(ends):
            n = len(ends)
            self.starts[self.documents : self.documents + n] = np.concatenate([[self._next_start], ends[:-1]])
            self._next_start = int(ends[-1])
            self.documents += n
        count = int(lengths[lo:hi].sum())
        self._segments.append(_Segment(ref, lo, hi, self.tokens, count))
        self.tokens += count
        self.pieces += hi - lo
        # shard k is full once the stream holds row (k + 1) * shard_rows - 1's last token
        while self.tokens >= (self.shards + 1) * self.shard_rows * self.seq_len + 1:
            self._submit(self.shard_rows)

    def _submit(self, rows: int) -> None:
        first = self.shards * self.shard_rows * self.seq_len
        end = first + rows * self.seq_len + 1
        needed = [s for s in self._segments if s.start < end and s.start + s.tokens > first and s.tokens]
        path = storage.join(self.location, self.split, shard_name(self.shards))
        segments = [(s.ref, s.lo, s.hi) for s in needed]
        self._pending.append(self._write.remote(path, segments, first - needed[0].start, rows, self.seq_len,
                                                self.dtype.name))  # fmt: skip
        self.shards += 1
        following = self.shards * self.shard_rows * self.seq_len  # the next shard's first token
        while self._segments and self._segments[0].start + self._segments[0].tokens <= following:
            self._segments.popleft()  # no later shard reads it: its block can go once the writes holding it end
        if len(self._pending) >= SHARDS_IN_FLIGHT:
            done, self._pending = ray.wait(self._pending, num_returns=1)
            ray.get(done)  # a failed write stops the stage here

    def close(self) -> dict:
        """Write the last, short shard and the document index; wait for every write; the split's counts."""
        sequences = (self.tokens - 1) // self.seq_len if self.tokens >= self.seq_len + 1 else 0
        if sequences > self.shards * self.shard_rows:
            self._submit(sequences - self.shards * self.shard_rows)
        ray.get(self._pending)
        self._pending = []
        with storage.open_output(storage.join(self.location, DOC_STARTS_DIR, f"{self.split}.npy")) as f:
            np.save(f, self.starts[: self.documents], allow_pickle=False)
        dropped = self.tokens - sequences * self.seq_len - 1 if sequences else self.tokens
        return {"documents": self.documents, "pieces": self.pieces, "tokens": self.tokens, "sequences": sequences,
                "dropped_tokens": dropped, "shards": self.shards}  # fmt: skip


def block_layouts(bundles, lookahead: int = 8):
    """(block ref, tokens per piece, document-end flags) of every block of an iterator of Ray Data ref bundles, in
    order; the layouts come from small tasks beside the blocks, `lookahead` of them in flight."""
    layout = ray.remote(_block_layout).options(num_cpus=HELPER_CPUS)
    waiting = deque()
    for bundle in bundles:
        for ref in bundle.block_refs:
            waiting.append((ref, layout.remote(ref)))
            if len(waiting) > lookahead:
                ref0, task = waiting.popleft()
                yield (ref0, *ray.get(task))
    while waiting:
        ref0, task = waiting.popleft()
        yield (ref0, *ray.get(task))
