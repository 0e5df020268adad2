"""Encoding documents in Ray Data: long documents cut into pieces, then an actor pool with one tokenizer each.

    (text)  ──split_long_documents (task, fused with the read)──▶  (text, last): pieces in order
            ──EncodeDocuments (actor pool, encode_batch_fast)──▶   (ids, last): the end-of-text id after
                                                                   the last piece of every document

A document longer than `max_chars` becomes several rows, so it spreads over batches and
actors instead of stalling one of them. Pieces are cut just before a whitespace character
that is followed by a non-whitespace one. The byte-level pre-tokenizer (GPT-2's pattern)
always starts a new pre-token there and its pattern looks at nothing before the cut, so the
pieces' ids joined are exactly the ids of the whole document. Only a window of `max_chars`
with no such place (a very long word) is cut anywhere, at a character.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

TEXT_COLUMN = "text"
LAST_COLUMN = "last"
IDS_COLUMN = "ids"
_CUT = re.compile(r"\s(?=\S)")


def split_text(text: str, max_chars: int) -> list[str]:
    """`text` as pieces of at most max_chars characters, cut before whitespace that precedes a non-space."""
    pieces, start, n = [], 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = None
        for m in _CUT.finditer(text, start + 1, end + 2):  # a cut at i keeps text[start:i]; i <= end
            cut = m.start()
        cut = cut or end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def split_long_documents(batch: pa.Table, max_chars: int) -> pa.Table:
    """Ray Data UDF: (text) -> (text, last), one row per piece; documents within max_chars stay one row."""
    texts = batch.column(TEXT_COLUMN).fill_null("")
    if batch.num_rows == 0 or pc.max(pc.utf8_length(texts)).as_py() <= max_chars:
        return pa.table({TEXT_COLUMN: texts, LAST_COLUMN: pa.array(np.ones(batch.num_rows, dtype=bool))})
    out_text, out_last = [], []
    for text in texts.to_pylist():
        pieces = split_text(text, max_chars) if len(text) > max_chars else [text]
        out_text.extend(pieces)
        out_last.extend([False] * (len(pieces) - 1) + [True])
    return pa.table({TEXT_COLUMN: pa.array(out_text, pa.string()), LAST_COLUMN: pa.array(out_last, pa.bool_())})


class EncodeDocuments:
    """Ray Data map_batches UDF: (text, last) pieces -> (ids, last), the separator after each document's last piece."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str, num_threads: int = 1):
        # tokenizers parallelizes encode_batch with rayon, whose pool would otherwise start a thread per core
        # in every actor. The pool starts at the first encode, so setting its size here takes effect
        # (a per-actor runtime_env would too, but costs seconds of worker start-up).
        os.environ["RAYON_NUM_THREADS"] = str(num_threads)
        # The tokenizer travels as its JSON text, so actors on other nodes need no shared filesystem.
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        # A document that contains the literal text of a special token gets that text's bytes,
        # not the separator id: only real document boundaries carry eos_id.
        self._tokenizer.encode_special_tokens = True
        self._eos_id = eos_id
        self._dtype = np.dtype(dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(TEXT_COLUMN).fill_null("").to_pylist()
        last = (
            batch.column(LAST_COLUMN).to_numpy(zero_copy_only=False)
            if LAST_COLUMN in batch.column_names
            else np.ones(len(texts), dtype=bool)
        )
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        flat: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for k, (encoding, ends) in enumerate(zip(encodings, last)):
            ids = encoding.ids
            flat.extend(ids)
            if ends:
                flat.append(self._eos_id)
            lengths[k] = len(ids) + bool(ends)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = pa.array(np.array(flat, dtype=self._dtype))
        ids = pa.LargeListArray.from_arrays(pa.array(offsets), values)
        return pa.table({IDS_COLUMN: ids, LAST_COLUMN: pa.array(np.asarray(last, dtype=bool))})


def block_stream(block: pa.Table) -> np.ndarray:
    """The flat token stream of an encoded block (documents in order, separators included)."""
    return block.column(IDS_COLUMN).combine_chunks().flatten().to_numpy()


def block_document_ends(block: pa.Table) -> np.ndarray:
    """Positions in block_stream(block) just after each document that ends in this block (after its separator)."""
    column = block.column(IDS_COLUMN).combine_chunks()
    offsets = column.offsets.to_numpy()
    ends = offsets[1:] - offsets[0]
    last = block.column(LAST_COLUMN).to_numpy(zero_copy_only=False) if LAST_COLUMN in block.column_names else None
    return ends if last is None else ends[last.astype(bool)]
