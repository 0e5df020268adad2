"""Gopher-style quality filters (Rae et al. 2021, "Scaling Language Models", appendix A), one pure function.

`drop_reason(text, cfg)` checks the enabled filters of `FiltersConfig` in the order of its
fields and names the first one the text fails, or returns KEPT (""). Words are whitespace-
separated tokens; lines are split on newlines, paragraphs on blank lines (the cleaner makes
every paragraph break exactly one blank line).

Repetition (Gopher's table A1): the fraction of lines (paragraphs) that repeat an earlier one,
the fraction of characters in such repeated lines (paragraphs), the fraction of characters in
the most frequent word n-gram for n = 2, 3, 4, and the fraction of characters covered by word
n-grams that occur more than once for n = 5..10 (each word counted once even when covered by
several overlapping repeated n-grams).
"""

from __future__ import annotations

import re

import numpy as np

from raylm.data.config import FiltersConfig, RepetitionFilter

KEPT = ""
EMPTY = "empty"
FILTER_NAMES: tuple[str, ...] = tuple(FiltersConfig.model_fields)
"""The filters, in the order they are checked; each one's name is the drop reason it gives."""
_BULLETS = ("•", "‣", "◦", "⁃", "●", "○", "▪", "·", "-", "*", "–", "—")
_ELLIPSES = ("...", "…")
_LETTER = re.compile(r"[^\W\d_]")


def drop_reason(text: str, cfg: FiltersConfig) -> str:
    """The name of the first enabled filter that `text` fails, `empty` for an empty text, or KEPT."""
    if not text:
        return EMPTY
    if cfg.length.enabled and len(text) < cfg.length.min_chars:
        return "length"
    words = text.split()
    n_words = len(words)
    if cfg.word_count.enabled and not cfg.word_count.min_words <= n_words <= cfg.word_count.max_words:
        return "word_count"
    if n_words == 0:
        return "word_count"  # nothing below can be judged on a text without words
    if cfg.mean_word_length.enabled:
        mean = sum(map(len, words)) / n_words
        if not cfg.mean_word_length.min <= mean <= cfg.mean_word_length.max:
            return "mean_word_length"
    if cfg.symbol_ratio.enabled:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n_words > cfg.symbol_ratio.max_ratio:
            return "symbol_ratio"
    if cfg.alpha_words.enabled:
        alpha = sum(1 for w in words if _LETTER.search(w))
        if alpha / n_words < cfg.alpha_words.min_fraction:
            return "alpha_words"
    if cfg.stop_words.enabled:
        stop = set(cfg.stop_words.words)
        if sum(1 for w in words if w.lower().strip(".,;:!?'\"()[]") in stop) < cfg.stop_words.min_count:
            return "stop_words"
    lines = text.split("\n")
    if cfg.repetition.enabled and _repetitive(text, lines, words, cfg.repetition):
        return "repetition"
    if cfg.ellipsis_lines.enabled:
        ending = sum(1 for line in lines if line.rstrip().endswith(_ELLIPSES))
        if ending / len(lines) > cfg.ellipsis_lines.max_fraction:
            return "ellipsis_lines"
    if cfg.bullet_lines.enabled:
        bullets = sum(1 for line in lines if line.lstrip().startswith(_BULLETS))
        if bullets / len(lines) > cfg.bullet_lines.max_fraction:
            return "bullet_lines"
    return KEPT


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, characters in them)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _repetitive(text: str, lines: list[str], words: list[str], cfg: RepetitionFilter) -> bool:
    total = len(text)
    dup_lines, dup_line_chars = _duplicates([line for line in lines if line.strip()])
    nonblank = sum(1 for line in lines if line.strip())
    if nonblank and dup_lines / nonblank > cfg.max_dup_line_fraction:
        return True
    if dup_line_chars / total > cfg.max_dup_line_char_fraction:
        return True
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    dup_paras, dup_para_chars = _duplicates(paragraphs)
    if paragraphs and dup_paras / len(paragraphs) > cfg.max_dup_paragraph_fraction:
        return True
    if dup_para_chars / total > cfg.max_dup_paragraph_char_fraction:
        return True
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    word_chars = int(lengths.sum())
    if word_chars == 0:
        return False
    _, word_ids = np.unique(np.array(words), return_inverse=True)
    word_ids = word_ids.astype(np.uint64) + np.uint64(1)
    span_chars = np.r_[0, np.cumsum(lengths)]  # chars of words i..j-1 = span_chars[j] - span_chars[i]
    for n, limit in cfg.max_top_ngram_char_fraction.items():
        if len(words) < n:
            continue
        keys = _ngram_keys(word_ids, n)
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] > 1:
            gram_chars = span_chars[first[top] + n] - span_chars[first[top]]
            if counts[top] * gram_chars / word_chars > limit:
                return True
    for n, limit in cfg.max_dup_ngram_char_fraction.items():
        if len(words) < n:
            continue
        keys = _ngram_keys(word_ids, n)
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        starts = np.flatnonzero(counts[inverse] > 1)
        if len(starts) == 0:
            continue
        covered = np.zeros(len(words) + 1, dtype=np.int64)  # a difference array over word positions
        np.add.at(covered, starts, 1)
        np.add.at(covered, starts + n, -1)
        if lengths[np.cumsum(covered[:-1]) > 0].sum() / word_chars > limit:
            return True
    return False


def _ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """One uint64 key per word n-gram (position i covers words i..i+n-1); equal n-grams get equal keys."""
    count = len(ids) - n + 1
    keys = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            keys = keys * np.uint64(0x100000001B3) + ids[k : k + count]
    return keys
