"""Pure functions of the prepare stage: cleaning, filters, hashing, dedup choice, split, stats. No Ray."""

from __future__ import annotations

import unicodedata

import pyarrow as pa
import pytest

from raylm.data.clean import DROP_REASONS, KEPT, clean_batch, clean_text, count_words, drop_reason
from raylm.data.dedup_exact import add_text_hash, keep_smallest_id, text_hash
from raylm.data.stats import build_stats, count_by_reason, count_by_split
from raylm.data.split import TRAIN, VALIDATION, add_split, split_of, split_point


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("  Hello,\t\tworld!  ", "Hello, world!"),
        ("one\r\ntwo\rthree", "one\ntwo\nthree"),
        ("para one\n\n\n\n\npara two", "para one\n\npara two"),
        ("line\n   \n\t\nnext", "line\n\nnext"),
        ("\ufeffNo\x00 nul\x07 or bell", "No nul or bell"),
        ("page\x0cbreak", "page\nbreak"),
        ("no\u00a0break\u2003spaces", "no break spaces"),
        ("    indented verse\n      more", "indented verse\nmore"),
        ("", ""),
        (" \n\t \r\n ", ""),
    ],
)
def test_clean_text(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_clean_text_makes_nfd_and_nfc_identical():
    nfc = unicodedata.normalize("NFC", "café naïve résumé")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    assert clean_text(nfd) == clean_text(nfc) == nfc


def test_clean_text_joins_an_accent_separated_by_a_control_character():
    assert clean_text("cafe\x00\u0301") == "café"


def test_clean_text_is_idempotent():
    messy = "\ufeff  A\u0301  b\t\r\n\r\n\r\n\x0c c\u00a0\u00a0d \x85 e\u2028f  "
    once = clean_text(messy)
    assert clean_text(once) == once


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("short text", "too_short"),
        ("=" * 50, "too_few_words"),
        ("one two three four five six seven eight nine ten eleven", KEPT),
    ],
)
def test_drop_reason(text, reason):
    assert drop_reason(text, min_chars=20, min_words=5) == reason


def test_count_words():
    assert count_words("a  b\nc\n\nd") == 4
    assert count_words("") == 0


def test_clean_batch_tags_and_measures():
    batch = pa.table({"id": ["a", "b", "c"], "text": ["  caf\u0065\u0301 au lait, s'il vous plaît  ", "", "x"]})
    out = clean_batch(batch, min_chars=5, min_words=2)
    assert out.column_names == ["id", "text", "raw_bytes", "bytes", "reason"]
    rows = out.to_pylist()
    assert rows[0]["text"] == "café au lait, s'il vous plaît"
    assert rows[0]["reason"] == KEPT
    assert rows[0]["raw_bytes"] == len(batch.column("text")[0].as_py().encode())
    assert rows[0]["bytes"] == len(rows[0]["text"].encode())
    assert [r["reason"] for r in rows[1:]] == ["empty", "too_short"]
    assert rows[2]["text"] == ""  # dropped texts are not carried further


def test_text_hash_equal_exactly_for_equal_text():
    assert text_hash("abc") == text_hash("abc")
    assert text_hash("abc") != text_hash("abc ")
    assert len(text_hash("abc")) == 32
    assert text_hash(clean_text("To  be,\tor not")) == text_hash(clean_text("To be, or not  "))


def test_keep_smallest_id_keeps_one_row_and_counts_copies():
    group = add_text_hash(pa.table({"id": ["s2:7", "s0:3", "s1:9"], "text": ["same"] * 3}))
    kept = keep_smallest_id(group)
    assert kept.num_rows == 1
    assert kept.column("id").to_pylist() == ["s0:3"]
    assert kept.column("copies").to_pylist() == [3]


def test_split_is_deterministic_and_seeded():
    texts = [f"document number {i}" for i in range(4000)]
    first = [split_of(t, seed=0, validation_fraction=0.1) for t in texts]
    assert first == [split_of(t, seed=0, validation_fraction=0.1) for t in texts]
    share = first.count(VALIDATION) / len(texts)
    assert 0.08 < share < 0.12
    assert first != [split_of(t, seed=1, validation_fraction=0.1) for t in texts]
    assert all(0.0 <= split_point(t, 7) < 1.0 for t in texts[:100])


def test_split_grows_monotonically_with_the_fraction():
    texts = [f"doc {i}" for i in range(500)]
    small = {t for t in texts if split_of(t, 0, 0.05) == VALIDATION}
    large = {t for t in texts if split_of(t, 0, 0.2) == VALIDATION}
    assert small <= large


def test_add_split_column():
    out = add_split(pa.table({"text": ["a", "b"]}), seed=0, validation_fraction=0.5)
    assert set(out.column("split").to_pylist()) <= {TRAIN, VALIDATION}


def test_stats_add_up():
    tagged = pa.table(
        {
            "id": list("abcde"),
            "text": ["x" * 10, "x" * 10, "", "", ""],
            "raw_bytes": [12, 11, 0, 3, 40],
            "bytes": [10, 10, 0, 3, 40],
            "reason": [KEPT, KEPT, "empty", "too_short", "too_few_words"],
        }
    )
    deduped = pa.table(
        {
            "id": ["a"],
            "text": ["x" * 10],
            "bytes": [10],
            "copies": [2],
            "split": [TRAIN],
        }
    )
    by_reason = {r["key"]: r for r in count_by_reason(tagged).to_pylist()}
    by_split = {r["key"]: r for r in count_by_split(deduped).to_pylist()}
    stats = build_stats(2, by_reason, by_split)
    assert stats["read"] == {"documents": 5, "bytes": 66}
    assert stats["clean"] == {"documents": 5, "bytes": 63}
    assert stats["filter"]["documents"] == 2
    assert {r: v["documents"] for r, v in stats["filter"]["removed"].items()} == dict.fromkeys(DROP_REASONS, 1)
    assert stats["dedup_exact"]["removed"] == {"documents": 1, "bytes": 10}
    assert stats["dedup_exact"]["duplicate_groups"] == 1
    assert stats["split"] == {"train": {"documents": 1, "bytes": 10}, "validation": {"documents": 0, "bytes": 0}}
