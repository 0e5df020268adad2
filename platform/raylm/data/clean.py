"""Cleaning and quality filters: pure functions on one text, and one batch function for Ray Data.

Cleaning makes texts that differ only in encoding details identical, so that exact dedup can
catch them: Unicode NFC, one newline convention, no control characters, single spaces, lines
without leading or trailing blanks, paragraphs separated by exactly one blank line.
"""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa

KEPT = ""
"""The drop reason of a document that passes every filter."""
DROP_REASONS = ("empty", "too_short", "too_few_words")
"""Why a document is dropped, in the order the filters are checked."""

# Line breaks other than \n: CRLF, CR, vertical tab, form feed, NEL, Unicode line/paragraph separators.
_LINE_BREAKS = re.compile(r"\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
# C0 and C1 control characters except tab and newline, plus the byte-order mark (U+FEFF).
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ufeff]")
# Any run of whitespace inside a line: spaces, tabs, no-break and other Unicode spaces.
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalize one document: NFC, `\\n` line breaks, no control characters, collapsed blanks.

    Runs of spaces and tabs become one space, every line is stripped, and runs of blank
    lines become a single blank line (a paragraph break). The result has no leading or
    trailing whitespace. Cleaning is idempotent: `clean_text(clean_text(t)) == clean_text(t)`.
    """
    text = _LINE_BREAKS.sub("\n", text)
    # Controls go before NFC: a control between a letter and its accent would keep them apart.
    text = _CONTROLS.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def count_words(text: str) -> int:
    """Whitespace-separated words."""
    return len(text.split())


def drop_reason(text: str, min_chars: int, min_words: int) -> str:
    """Why a cleaned text is dropped (`empty`, `too_short`, `too_few_words`), or `KEPT` ("")."""
    if not text:
        return "empty"
    if len(text) < min_chars:
        return "too_short"
    if count_words(text) < min_words:
        return "too_few_words"
    return KEPT


def clean_batch(batch: pa.Table, *, min_chars: int, min_words: int) -> pa.Table:
    """Ray Data batch function: clean `text` and tag each document with why it is dropped.

    In: columns `id`, `text`. Out: `id`, `text` (cleaned; emptied for dropped documents, whose
    text is no longer needed), `raw_bytes` (UTF-8 bytes as read), `bytes` (UTF-8 bytes after
    cleaning), `reason` (`KEPT` or one of `DROP_REASONS`). Dropped rows stay, so that the
    statistics can count them per reason.
    """
    texts, raw_bytes, clean_bytes, reasons = [], [], [], []
    for raw in batch.column("text").to_pylist():
        text = clean_text(raw)
        reason = drop_reason(text, min_chars, min_words)
        raw_bytes.append(len(raw.encode("utf-8")))
        clean_bytes.append(len(text.encode("utf-8")))
        reasons.append(reason)
        texts.append(text if reason == KEPT else "")
    return pa.table(
        {
            "id": batch.column("id"),
            "text": pa.array(texts, pa.string()),
            "raw_bytes": pa.array(raw_bytes, pa.int64()),
            "bytes": pa.array(clean_bytes, pa.int64()),
            "reason": pa.array(reasons, pa.string()),
        }
    )
