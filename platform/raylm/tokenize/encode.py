"""Encoding documents in Ray Data: a callable class run by an actor pool, one tokenizer per actor.

Each call encodes one batch of documents with a single `encode_batch_fast` call (the
`tokenizers` batch encoder without character offsets, which packing never uses) and
returns the ids with the separator after each document as one Arrow list column.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from raylm.tokenize.packing import join_documents

TEXT_COLUMN = "text"
IDS_COLUMN = "ids"


class EncodeDocuments:
    """Ray Data map_batches UDF: a pyarrow batch with a `text` column -> a batch with an `ids` list column."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str, num_threads: int = 1):
        # tokenizers parallelizes encode_batch with rayon, whose pool would otherwise start a thread per core
        # in every actor. The pool starts at the first encode, so setting its size here takes effect
        # (a per-actor runtime_env would too, but costs seconds of worker start-up).
        os.environ["RAYON_NUM_THREADS"] = str(num_threads)
        from tokenizers import Tokenizer

        # The tokenizer travels as its JSON text, so actors on other nodes need no shared filesystem.
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        # A document that contains the literal text of a special token gets that text's bytes,
        # not the separator id: only real document boundaries carry eos_id.
        self._tokenizer.encode_special_tokens = True
        self._eos_id = eos_id
        self._dtype = np.dtype(dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(TEXT_COLUMN).fill_null("").to_pylist()
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        stream, offsets = join_documents([e.ids for e in encodings], self._eos_id, self._dtype)
        ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(stream))
        return pa.table({IDS_COLUMN: ids})


def block_stream(block: pa.Table) -> np.ndarray:
    """The flat token stream of an encoded block (documents in order, separators included)."""
    return block.column(IDS_COLUMN).combine_chunks().flatten().to_numpy()
