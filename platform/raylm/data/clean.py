"""Cleaning: pure functions on one text, and the batch function of Ray Data that cleans, redacts and filters.

Cleaning makes texts that differ only in encoding details identical, so that exact dedup can
catch them: Unicode NFC, one newline convention, no control characters, single spaces, lines
without leading or trailing blanks, paragraphs separated by exactly one blank line.
"""

from __future__ import annotations

import html
import re
import unicodedata

import pyarrow as pa

from raylm.data.config import CleanConfig, FiltersConfig
from raylm.data.filters import KEPT, drop_reason
from raylm.data.pii import PLACEHOLDERS, redact_pii

QUARANTINED = "quarantined"
"""The drop reason of a bad input record (malformed, undecodable, ...): it is kept aside, not cleaned."""
PII_COLUMNS = tuple(f"pii_{kind}" for kind in PLACEHOLDERS)

# Line breaks other than \n: CRLF, CR, vertical tab, form feed, NEL, Unicode line/paragraph separators.
_LINE_BREAKS = re.compile(r"\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
# C0 and C1 control characters except tab and newline, plus the byte-order mark (U+FEFF).
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ufeff]")
# Any run of whitespace inside a line: spaces, tabs, no-break and other Unicode spaces.
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")

# Markup: a text "has markup" when it holds a tag-like `<name ...>`, `</name>`, `<!-- -->` or `<!DOCTYPE`.
_HAS_MARKUP = re.compile(r"<(?:/?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?|!--.*?--|![A-Za-z][^<>]*)>", re.S)
_INVISIBLE = re.compile(r"<(script|style|head|template|noscript)\b[^>]*>.*?</\1\s*>|<!--.*?-->|<![A-Za-z][^<>]*>", re.S | re.I)
_BLOCK_TAGS = re.compile(
    r"</?(?:p|div|br|hr|li|ul|ol|dl|dt|dd|tr|table|thead|tbody|h[1-6]|blockquote|pre|section|article|header"
    r"|footer|nav|aside|main|figure|figcaption|title|body|html)\b[^>]*>",
    re.I,
)
_ANY_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")


def strip_markup(text: str) -> str:
    """Text without HTML/XML markup: invisible elements and comments dropped, block tags as line breaks, entities decoded.

    Text without a tag-like `<...>` is returned unchanged, so a stray `a < b` or `<3` stays.
    """
    if not _HAS_MARKUP.search(text):
        return text
    text = _INVISIBLE.sub("", text)
    text = _BLOCK_TAGS.sub("\n", text)
    text = _ANY_TAG.sub("", text)
    return html.unescape(text)


def clean_text(text: str, cfg: CleanConfig = CleanConfig()) -> str:
    """Normalize one document: markup removed, Unicode normal form, `\\n` line breaks, no control characters, collapsed blanks.

    Runs of spaces and tabs become one space, every line is stripped, and runs of blank
    lines become a single blank line (a paragraph break). The result has no leading or
    trailing whitespace. Cleaning is idempotent: `clean_text(clean_text(t)) == clean_text(t)`.
    (PII redaction is separate: `redact_pii`.)
    """
    if cfg.strip_html:
        text = strip_markup(text)
    text = _LINE_BREAKS.sub("\n", text)
    # Controls go before normalization: a control between a letter and its accent would keep them apart.
    text = _CONTROLS.sub("", text)
    if cfg.unicode_normalization != "none":
        text = unicodedata.normalize(cfg.unicode_normalization, text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def count_words(text: str) -> int:
    """Whitespace-separated words."""
    return len(text.split())


def clean_batch(batch: pa.Table, *, clean: CleanConfig, filters: FiltersConfig) -> pa.Table:
    """Ray Data batch function: clean `text`, redact PII, and tag each document with why it is dropped.

    In: columns `id`, `text`, and optionally `error_kind`, `error` (non-null for a bad input
    record, which passes through untouched with reason `quarantined`). Out: `id`, `text`
    (cleaned; emptied for dropped documents, whose text is no longer needed), `raw_bytes`
    (UTF-8 bytes as read), `bytes` (after cleaning), `reason` (KEPT, `empty`, a filter name, or
    `quarantined`), `error_kind`, `error`, and the PII counts `pii_email`, `pii_ip_address`,
    `pii_phone_number`. Dropped rows stay, so that the statistics can count them per reason.
    """
    n = batch.num_rows
    kinds = batch.column("error_kind").to_pylist() if "error_kind" in batch.column_names else [None] * n
    errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * n
    texts, raw_bytes, clean_bytes, reasons = [], [], [], []
    pii = {column: [] for column in PII_COLUMNS}
    for raw, kind in zip(batch.column("text").to_pylist(), kinds):
        raw = raw or ""
        raw_bytes.append(len(raw.encode("utf-8")))
        if kind is not None:
            texts.append(raw)
            clean_bytes.append(0)
            reasons.append(QUARANTINED)
            for column in PII_COLUMNS:
                pii[column].append(0)
            continue
        text, found = redact_pii(clean_text(raw, clean), clean.pii)
        reason = drop_reason(text, filters)
        clean_bytes.append(len(text.encode("utf-8")))
        reasons.append(reason)
        texts.append(text if reason == KEPT else "")
        for k, count in found.items():
            pii[f"pii_{k}"].append(count)
    return pa.table(
        {
            "id": batch.column("id").cast(pa.string()),
            "text": pa.array(texts, pa.string()),
            "raw_bytes": pa.array(raw_bytes, pa.int64()),
            "bytes": pa.array(clean_bytes, pa.int64()),
            "reason": pa.array(reasons, pa.string()),
            "error_kind": pa.array(kinds, pa.string()),
            "error": pa.array(errors, pa.string()),
        }
        | {column: pa.array(values, pa.int64()) for column, values in pii.items()}
    )
