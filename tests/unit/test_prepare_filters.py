"""The Gopher quality filters and PII redaction, one rule at a time (no Ray)."""

from __future__ import annotations

import pytest

from raylm.data.config import FiltersConfig, PiiConfig
from raylm.data.filters import FILTER_NAMES, KEPT, drop_reason
from raylm.data.pii import redact_pii

PROSE = (
    "The quick brown fox jumps over the lazy dog, and then it runs to the river to drink with the other animals.\n"
    "Later that day the fox met a crow that had a piece of cheese, and it began to flatter the bird with words.\n\n"
    "A new paragraph tells how the crow opened its beak to sing and let the cheese fall to the ground below it."
)


def test_plain_prose_passes_every_default_filter():
    assert drop_reason(PROSE, FiltersConfig()) == KEPT
    assert FILTER_NAMES == ("length", "word_count", "mean_word_length", "symbol_ratio", "alpha_words", "stop_words",
                            "repetition", "ellipsis_lines", "bullet_lines")  # fmt: skip


def _distinct_line(i: int) -> str:
    return " ".join(f"tok{i}x{j}" for j in range(8))


REPEATED_LINES = "\n".join(["Buy cheap watches now and save big on every order today"] * 6 + [PROSE])
NGRAM_SPAM = PROSE + "\n" + " ".join(["click here to win the prize"] * 12)


@pytest.mark.parametrize(
    "name, text",
    [
        ("length", "Too short."),
        ("word_count", "word " * 10),
        ("mean_word_length", PROSE.replace(" ", " a ")),  # many one-letter words
        ("symbol_ratio", PROSE + " " + "#hashtag " * 30),
        ("alpha_words", PROSE + " " + "12 34 56 78 90 " * 10),
        ("stop_words", " ".join(f"alpha{i} beta{i} gamma{i}" for i in range(30))),
        ("repetition", REPEATED_LINES),
        ("repetition", NGRAM_SPAM),
        ("ellipsis_lines", "\n".join(_distinct_line(i) + "..." for i in range(10)) + "\n" + PROSE),
        ("bullet_lines", "\n".join("- " + _distinct_line(i) for i in range(40)) + "\n" + PROSE),
    ],
)
def test_each_filter_catches_its_case_and_can_be_switched_off(name, text):
    cfg = FiltersConfig(length={"min_chars": 50}, word_count={"min_words": 20, "max_words": 10_000})
    if name != "length":
        assert len(text) >= 50
    assert drop_reason(text, cfg) == name
    off = FiltersConfig(**{n: {"enabled": False} for n in FILTER_NAMES})
    assert drop_reason(text, off) == KEPT


def test_first_failing_filter_names_the_reason():
    text = "# " * 60  # too few distinct words? no: 60 words; fails symbol ratio and alpha words; symbol ratio is first
    cfg = FiltersConfig(length={"min_chars": 10}, word_count={"min_words": 5})
    assert drop_reason(text, cfg) == "mean_word_length"  # 1-character words come before symbols
    assert drop_reason("", cfg) == "empty"


def test_word_count_upper_bound():
    cfg = FiltersConfig(word_count={"min_words": 1, "max_words": 10}, length={"min_chars": 1})
    assert drop_reason(PROSE, cfg) == "word_count"


def test_duplicate_ngram_fraction_counts_each_word_once():
    # A 7-word phrase repeated twice in 60 words: covered words are 14 of 60 (about 23% of characters),
    # above the 5-gram limit (15%) only because overlapping n-grams are not double counted into >100%.
    base = " ".join(f"word{i}" for i in range(46))
    text = base + " one two three four five six seven one two three four five six seven"
    cfg = FiltersConfig(length={"min_chars": 10}, word_count={"min_words": 5},
                        **{n: {"enabled": False} for n in ("stop_words", "alpha_words", "mean_word_length")})  # fmt: skip
    assert drop_reason(text, cfg) == "repetition"
    loose = cfg.model_copy(update={"repetition": cfg.repetition.model_copy(
        update={"max_dup_ngram_char_fraction": {5: 0.99}, "max_top_ngram_char_fraction": {}})})  # fmt: skip
    assert drop_reason(text, loose) == KEPT


PII_ON = PiiConfig(enabled=True)


@pytest.mark.parametrize(
    "text, redacted, counts",
    [
        ("write to jane.doe+news@example.co.uk today", "write to <EMAIL> today", {"email": 1}),
        ("hosts 192.168.0.1 and 10.0.0.256", "hosts <IP_ADDRESS> and 10.0.0.256", {"ip_address": 1}),
        ("v6 2001:db8::1 at 12:30:45", "v6 <IP_ADDRESS> at 12:30:45", {"ip_address": 1}),
        ("call +1 415 555 2671 or (415) 555-2671", "call <PHONE_NUMBER> or <PHONE_NUMBER>", {"phone_number": 2}),
        ("In 1599, act 3.2.1, lines 12-14, on 2024-11-22", "In 1599, act 3.2.1, lines 12-14, on 2024-11-22", {}),
        ("HAMLET: To be, or not to be: that is the question.", "HAMLET: To be, or not to be: that is the question.", {}),
    ],
)
def test_pii_redaction(text, redacted, counts):
    out, found = redact_pii(text, PII_ON)
    assert out == redacted
    assert {k: v for k, v in found.items() if v} == counts


def test_pii_off_by_default_and_per_kind():
    text = "mail a@b.org from 10.1.2.3"
    assert redact_pii(text, PiiConfig()) == (text, {"email": 0, "ip_address": 0, "phone_number": 0})
    assert redact_pii(text, PiiConfig(enabled=True, emails=False))[0] == "mail a@b.org from <IP_ADDRESS>"
