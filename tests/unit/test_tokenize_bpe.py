"""Byte-level BPE training and the Ray Data encoding UDF, called directly (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from raylm.errors import ConfigError, InputError
from raylm.tokenize.bpe import (
    check_vocab_size, eos_token_id, load_existing_tokenizer, load_tokenizer, train_tokenizer, vocab_size_of,
)
from raylm.tokenize.config import TokenizeConfig
from raylm.tokenize.encode import EncodeDocuments, block_document_ends, block_stream, split_long_documents, split_text

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


def test_gpt2_files_load_with_gpt2_ids(gpt2_files, tmp_path):
    gpt2 = load_existing_tokenizer(gpt2_files, ["<|endoftext|>"])
    assert gpt2.encode("Hello world").ids == [15496, 995]  # GPT-2's published ids
    assert gpt2.token_to_id("<|endoftext|>") == 50256 and vocab_size_of(gpt2) == 50257
    text = "  Ünïcödé 🦊\n\ttabs, 'quotes' and   spaces "
    assert gpt2.decode(gpt2.encode(text).ids) == text
    # the Hugging Face names of the same files, and a tokenizer.json saved from it, load the same tokenizer
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/vocab.json").write_bytes((gpt2_files / "encoder.json").read_bytes())
    (tmp_path / "hf/merges.txt").write_bytes((gpt2_files / "vocab.bpe").read_bytes())
    gpt2.save(str(tmp_path / "saved.json"))
    for other in (tmp_path / "hf", tmp_path / "saved.json"):
        assert load_existing_tokenizer(other, ["<|endoftext|>"]).encode(text).ids == gpt2.encode(text).ids
    # special tokens the vocabulary lacks are added after it
    extended = load_existing_tokenizer(gpt2_files, ["<|endoftext|>", "<|pad|>"])
    assert extended.token_to_id("<|pad|>") == 50257 and vocab_size_of(extended) == 50258
    with pytest.raises(InputError, match="no tokenizer in this directory"):
        load_existing_tokenizer(tmp_path, ["<|endoftext|>"])


@pytest.mark.parametrize("max_chars", [64, 100, 1000])
def test_documents_cut_into_pieces_encode_to_the_same_ids(gpt2_files, tokenizer, demo_texts, max_chars):
    """Cutting before whitespace keeps GPT-2's pre-tokens, so the pieces' ids are the document's ids."""
    gpt2 = load_existing_tokenizer(gpt2_files, ["<|endoftext|>"])
    texts = demo_texts[:40] + ["word " * 300, "a  b\n\n\nc\t\td " * 50, "x" * 250 + " tail"]
    for tok in (gpt2, tokenizer):
        for text in texts:
            pieces = split_text(text, max_chars)
            assert "".join(pieces) == text and all(0 < len(p) <= max_chars for p in pieces)
            joined = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
            if text.startswith("x" * 250):  # no whitespace in a whole window: cut inside the word, ids may differ
                assert tok.decode(joined) == text
            else:
                assert joined == tok.encode(text, add_special_tokens=False).ids


def test_pieces_get_one_separator_per_document(tokenizer, monkeypatch):
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    docs = ["short one", "a much longer document " * 20, "", "tail"]
    pieces = split_long_documents(pa.table({"text": docs}), max_chars=64)
    last = pieces.column("last").to_pylist()
    assert pieces.num_rows > len(docs) and sum(last) == len(docs)
    assert "".join(pieces.column("text").to_pylist()) == "".join(docs)
    out = EncodeDocuments(tokenizer.to_str(), eos_id=0, dtype="uint16")(pieces)
    stream = block_stream(out)
    whole = [i for d in docs for i in tokenizer.encode(d, add_special_tokens=False).ids + [0]]
    assert stream.tolist() == whole
    ends = block_document_ends(out)
    assert ends.tolist() == np.cumsum([len(tokenizer.encode(d, add_special_tokens=False).ids) + 1 for d in docs]).tolist()
    unsplit = split_long_documents(pa.table({"text": ["tiny", None]}), max_chars=64)
    assert unsplit.column("text").to_pylist() == ["tiny", ""] and unsplit.column("last").to_pylist() == [True, True]


@pytest.mark.parametrize("cpus, per_actor, want", [(4, 1, 2), (3, 1, 2), (2, 1, 1), (1, 1, 1), (8, 2, 2), (4, 2, 1)])
def test_the_encoding_pool_leaves_a_cpu_for_the_tasks_that_read_its_texts(cpus, per_actor, want):
    """Actors holding every CPU of a small cluster would wait forever for texts no task could read (a 2-CPU
    cluster hung this way with the default 2 actors)."""
    from raylm.tokenize.stage import encode_pool_size

    tc = TokenizeConfig(input="in", output="out", encode_actors=2, encode_cpus_per_actor=per_actor)
    assert encode_pool_size(tc, cpus) == want
