"""Byte-level BPE training and the Ray Data encoding UDF, called directly (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from raylm.errors import ConfigError, InputError
from raylm.tokenize.bpe import check_vocab_size, eos_token_id, load_tokenizer, train_tokenizer
from raylm.tokenize.config import TokenizeConfig
from raylm.tokenize.encode import EncodeDocuments, block_stream

SPECIALS = ("<|endoftext|>", "<|pad|>")
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ünïcödé, emoji 🦊 and\ttabs\n\nnew lines   spaces.",
    "the the the quick quick fox fox fox dog",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXTS * 20], vocab_size=300, min_frequency=2, special_tokens=SPECIALS, show_progress=False)


def test_special_tokens_come_first_and_the_first_is_eos(tokenizer):
    assert eos_token_id(tokenizer, SPECIALS) == 0
    assert tokenizer.token_to_id(SPECIALS[1]) == 1
    assert 256 + len(SPECIALS) < tokenizer.get_vocab_size() <= 300


@pytest.mark.parametrize("text", TEXTS + ["never seen: Ωμέγα ∑ 中文 \x00\x7f", ""])
def test_decode_of_encode_is_the_input(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text


def test_saved_tokenizer_loads_and_bad_files_are_input_errors(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(TEXTS[1]).ids == tokenizer.encode(TEXTS[1]).ids
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_vocabulary_too_small_for_bytes_and_specials():
    with pytest.raises(ConfigError, match="vocab_size: 257 is too small.*258"):
        check_vocab_size(257, SPECIALS)
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer([TEXTS], vocab_size=200, min_frequency=1, special_tokens=SPECIALS, show_progress=False)
    with pytest.raises(ValidationError, match="vocab_size 260 is too small"):
        TokenizeConfig(input="in", output="out", vocab_size=260, special_tokens=tuple(f"<s{i}>" for i in range(5)))


def test_encode_udf_appends_eos_and_keeps_literal_special_text(tokenizer, monkeypatch):
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")  # the UDF sets it for its actor; restore this process's afterwards
    udf = EncodeDocuments(tokenizer.to_str(), eos_id=0, dtype="uint16")
    docs = [TEXTS[0], "", "a literal <|endoftext|> inside", None]
    out = udf(pa.table({"id": ["a", "b", "c", "d"], "text": docs}))
    assert out.num_rows == 4
    per_doc = out.column("ids").to_pylist()
    for doc, ids in zip(docs, per_doc):
        assert ids[-1] == 0 and 0 not in ids[:-1]  # only the boundary is the separator
        assert tokenizer.decode(ids[:-1]) == (doc or "")
    stream = block_stream(out)
    assert stream.dtype == np.uint16
    assert stream.tolist() == [i for ids in per_doc for i in ids]
    # a sliced block (as the driver routes splits) gives just its documents
    assert block_stream(out.slice(2, 1)).tolist() == per_doc[2]
