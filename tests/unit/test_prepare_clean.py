"""Pure functions of the prepare stage: cleaning, filters, hashing, dedup choice, split, stats. No Ray."""

from __future__ import annotations

import unicodedata

import pyarrow as pa
import pytest

from raylm.data.clean import KEPT, clean_batch, clean_text, count_words
from raylm.data.config import CleanConfig, FiltersConfig
from raylm.data.dedup_exact import text_hash
from raylm.data.stats import count_documents, size_histogram, sum_rows
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


def test_count_words():
    assert count_words("a  b\nc\n\nd") == 4
    assert count_words("") == 0


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("<p>Hello &amp; <b>welcome</b></p><p>Second</p>", "Hello & welcome\n\nSecond"),
        ("<html><head><style>p {color: red}</style><title>t</title></head><body>Body text</body></html>", "Body text"),
        ("<div>one<br>two</div><!-- hidden --><script>var x = 1;</script>", "one\ntwo"),
        ("if a < b and c > d then <3", "if a < b and c > d then <3"),
        ("Tom &amp; Jerry without tags", "Tom &amp; Jerry without tags"),
    ],
)
def test_markup_is_removed_only_from_texts_with_markup(raw, cleaned):
    assert clean_text(raw) == cleaned
    assert clean_text(raw, CleanConfig(strip_html=False)) == clean_text(raw, CleanConfig(strip_html=False))


def test_normal_forms():
    ligature = "ﬁne caf\u0065\u0301"
    assert clean_text(ligature) == "ﬁne café"
    assert clean_text(ligature, CleanConfig(unicode_normalization="NFKC")) == "fine café"
    assert clean_text(ligature, CleanConfig(unicode_normalization="none")) == ligature


PERMISSIVE = FiltersConfig(length={"min_chars": 5}, word_count={"min_words": 2}, stop_words={"enabled": False})


def test_clean_batch_tags_measures_and_passes_bad_records_through():
    batch = pa.table(
        {
            "id": ["a", "b", "c", "f:3"],
            "text": ["  caf\u0065\u0301 au lait, mail me at x@example.org  ", "", "x", '{"broken'],
            "error_kind": [None, None, None, "malformed_json"],
            "error": [None, None, None, "f:3: malformed JSON"],
        }
    )
    pii = CleanConfig(pii={"enabled": True})
    out = clean_batch(batch, clean=pii, filters=PERMISSIVE)
    assert out.column_names == ["id", "text", "raw_bytes", "bytes", "reason", "error_kind", "error",
                                "pii_email", "pii_ip_address", "pii_phone_number"]  # fmt: skip
    rows = out.to_pylist()
    assert rows[0]["text"] == "café au lait, mail me at <EMAIL>"
    assert rows[0]["reason"] == KEPT and rows[0]["pii_email"] == 1
    assert rows[0]["raw_bytes"] == len(batch.column("text")[0].as_py().encode())
    assert rows[0]["bytes"] == len(rows[0]["text"].encode())
    assert [r["reason"] for r in rows[1:]] == ["empty", "length", "quarantined"]
    assert rows[2]["text"] == ""  # dropped texts are not carried further
    assert rows[3]["text"] == '{"broken' and rows[3]["error"] == "f:3: malformed JSON"


def test_clean_batch_without_error_columns():
    out = clean_batch(pa.table({"id": ["a"], "text": ["hello there world"]}), clean=CleanConfig(),
                      filters=PERMISSIVE)  # fmt: skip
    assert out.column("reason").to_pylist() == [KEPT]
    assert out.column("error_kind").to_pylist() == [None]


def test_text_hash_equal_exactly_for_equal_text():
    assert text_hash("abc") == text_hash("abc")
    assert text_hash("abc") != text_hash("abc ")
    assert len(text_hash("abc")) == 32
    assert text_hash(clean_text("To  be,\tor not")) == text_hash(clean_text("To be, or not  "))


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


def test_size_histogram_bins():
    assert size_histogram({2: 5, 3: 2, 4: 1, 7: 1, 8: 3, 100: 1}) == {"2": 5, "3": 2, "4-7": 2, "8-15": 3, "64-127": 1}


def test_count_documents_groups_outcomes():
    block = pa.table(
        {
            "reason": ["", "", "length", "quarantined", "quarantined"],
            "error_kind": [None, None, None, "malformed_json", "truncated"],
            "raw_bytes": [10, 12, 3, 5, 6],
            "bytes": [9, 12, 3, 0, 0],
            "pii_email": [1, 0, 0, 0, 0],
            "pii_ip_address": [0, 0, 0, 0, 0],
            "pii_phone_number": [0, 2, 0, 0, 0],
        }
    )
    rows = sum_rows(count_documents(block).to_pylist())
    assert rows["kept"] == {"documents": 2, "raw_bytes": 22, "bytes": 21, "pii_email": 1, "pii_ip_address": 0,
                            "pii_phone_number": 2}  # fmt: skip
    assert rows["length"]["documents"] == 1
    assert rows["quarantined:malformed_json"]["documents"] == 1 and rows["quarantined:truncated"]["documents"] == 1
