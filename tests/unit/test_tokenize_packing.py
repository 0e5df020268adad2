"""Packing token streams into overlapping rows: nothing lost, rows overlap by one id, only a short tail dropped."""

from __future__ import annotations

import numpy as np
import pytest

from raylm.tokenize.packing import RowBatcher, SequencePacker, cut_rows, join_documents, pack_documents
from raylm.tokenize.shards import token_dtype

EOS = 0


def unpack(rows: np.ndarray) -> np.ndarray:
    """The stream the rows cover: the first row, then each next row without its first (shared) id."""
    if len(rows) == 0:
        return np.zeros(0, dtype=rows.dtype)
    return np.concatenate([rows[0], rows[1:, 1:].reshape(-1)])


def test_join_documents_puts_the_separator_after_every_document():
    stream, offsets = join_documents([[5, 6, 7], [], [8]], EOS, np.dtype(np.uint16))
    assert stream.tolist() == [5, 6, 7, EOS, EOS, 8, EOS]
    assert offsets.tolist() == [0, 4, 5, 7]
    assert stream.dtype == np.uint16


@pytest.mark.parametrize("length", [0, 1, 8, 9, 10, 16, 17, 18, 100, 101])
def test_no_token_lost_and_only_a_short_tail_dropped(length):
    seq_len = 8
    stream = np.arange(1, length + 1, dtype=np.int64)
    rows, rest = cut_rows(stream, seq_len)
    assert rows.shape[1] == seq_len + 1
    n = len(rows)
    covered = n * seq_len + 1 if n else 0
    assert n == max(0, (length - 1) // seq_len)
    np.testing.assert_array_equal(unpack(rows), stream[:covered])
    dropped = length - covered
    assert 0 <= dropped < (seq_len if n else seq_len + 1)
    packer = SequencePacker(seq_len, np.int64)
    packer.add(stream)
    assert packer.dropped_tokens == dropped
    assert packer.tokens_in == length
    if n:
        assert rest[0] == rows[-1, -1]  # the next row would start with the last row's last id


def test_consecutive_rows_overlap_by_one_token():
    rows, _ = cut_rows(np.arange(1000, dtype=np.int64), 16)
    assert len(rows) == 62
    np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])
    # every id after the first is a target (rows[:, 1:]) exactly once
    targets = rows[:, 1:].reshape(-1)
    assert len(np.unique(targets)) == len(targets) == 62 * 16


def test_pack_documents_counts_every_document_and_separator():
    docs = [list(range(1, k + 1)) for k in (3, 0, 11, 7, 30, 2)]
    rows, dropped = pack_documents(docs, EOS, seq_len=8)
    total = sum(len(d) + 1 for d in docs)
    assert total == 59
    assert len(rows) == (total - 1) // 8
    assert dropped == total - (len(rows) * 8 + 1)
    expected, _ = join_documents(docs, EOS, np.dtype(np.int64))
    assert unpack(rows).tolist() == expected[: total - dropped].tolist()


def test_packing_does_not_depend_on_how_the_stream_is_chunked():
    rng = np.random.default_rng(0)
    stream = rng.integers(1, 5000, size=5003).astype(np.uint16)
    whole, whole_rest = cut_rows(stream, 32)
    for trial in range(5):
        cuts = np.sort(rng.choice(np.arange(1, len(stream)), size=trial * 7 + 1, replace=False))
        packer = SequencePacker(32, np.uint16)
        rows = np.concatenate([packer.add(chunk) for chunk in np.split(stream, cuts)])
        np.testing.assert_array_equal(rows, whole)
        assert packer.dropped_tokens == len(whole_rest) - 1
    assert whole.dtype == np.uint16


def test_row_batcher_makes_full_shards_and_one_short_last():
    width = 5
    rows = np.arange(23 * width).reshape(23, width)
    batcher = RowBatcher(rows_per_batch=4, width=width, dtype=rows.dtype)
    out = []
    for chunk in np.split(rows, [1, 2, 9, 9, 20]):
        out.extend(batcher.add(chunk))
    out.extend(batcher.flush())
    assert [len(b) for b in out] == [4, 4, 4, 4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(out), rows)
    assert list(batcher.flush()) == []


@pytest.mark.parametrize(
    "vocab_size, dtype",
    [(2, np.uint8), (256, np.uint8), (257, np.uint16), (4096, np.uint16), (65536, np.uint16), (65537, np.uint32)],
)
def test_token_dtype_is_the_smallest_that_holds_the_vocabulary(vocab_size, dtype):
    assert token_dtype(vocab_size) == np.dtype(dtype)
    assert np.iinfo(token_dtype(vocab_size)).max >= vocab_size - 1
