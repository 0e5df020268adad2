"""MinHash signatures, LSH band keys and shingling (no Ray), cross-checked against datasketch."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raylm.data.minhash import (MinHasher, band_keys, candidate_probability, estimate_jaccard, jaccard, lsh_params,
                                shingle_hashes, words)  # fmt: skip

CORPUS = Path(__file__).resolve().parents[2] / "platform/raylm/assets/demo_corpus/shard-00.jsonl"


def _texts(n: int = 60) -> list[str]:
    lines = CORPUS.read_text().splitlines()
    return [t for t in (json.loads(line)["text"] for line in lines) if len(t.split()) > 200][:n]


def _edit(text: str, rate: float, rng: random.Random) -> str:
    ws = text.split()
    return " ".join(rng.choice(ws) if rng.random() < rate else w for w in ws)


def test_words_ignore_case_and_punctuation():
    assert words("To be, or NOT to-be: that's it!") == ["to", "be", "or", "not", "to", "be", "that", "s", "it"]
    assert np.array_equal(shingle_hashes("Hello, World! again and again"), shingle_hashes("hello world again and again"))


def test_shingles_are_sorted_unique_and_short_texts_are_one_shingle():
    h = shingle_hashes("a b c d e f g a b c d e", ngram=5)
    assert h.dtype == np.uint64 and np.all(np.diff(h.astype(np.float64)) > 0)
    assert len(h) == 8 - 1 + 0  # 8 windows, "a b c d e" twice
    assert len(shingle_hashes("three short words", ngram=5)) == 1
    assert len(shingle_hashes("", ngram=5)) == 0
    assert len(shingle_hashes("abcdef", unit="char", ngram=3)) == 4


def test_shingles_are_the_same_in_another_process():
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."
    here = shingle_hashes(text).tolist()
    code = f"from raylm.data.minhash import shingle_hashes; print(shingle_hashes({text!r}).tolist())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert str(here) == there


def test_exact_jaccard():
    a, b = np.array([1, 2, 3, 4], np.uint64), np.array([3, 4, 5], np.uint64)
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert jaccard(a, a) == 1.0 and jaccard(a, np.array([], np.uint64)) == 0.0


def test_signatures_match_a_direct_computation_and_batching():
    texts = _texts(10)
    hasher = MinHasher(64, seed=1, chunk_elements=64 * 300)  # small chunks: many batches
    shingles = [shingle_hashes(t) for t in texts] + [np.zeros(0, np.uint64)]
    sigs = hasher.signatures(shingles)
    for s, sig in zip(shingles[:-1], sigs):
        direct = ((s[:, None] * hasher.a[None, :] + hasher.b[None, :]) >> np.uint64(32)).min(axis=0)
        assert np.array_equal(direct.astype(np.uint32), sig)
    assert np.all(sigs[-1] == 0xFFFFFFFF)  # no shingles: the sentinel signature
    assert np.array_equal(MinHasher(64, seed=1).signatures(shingles), sigs)


def test_estimates_are_within_sampling_error_and_as_good_as_datasketch():
    datasketch = pytest.importorskip("datasketch")
    rng = random.Random(0)
    hasher = MinHasher(128, seed=7)
    ours, theirs = [], []
    for text in _texts(40):
        copy = _edit(text, rng.choice([0.02, 0.05, 0.1, 0.2]), rng)
        a, b = shingle_hashes(text), shingle_hashes(copy)
        truth = jaccard(a, b)
        sig = hasher.signatures([a, b])
        ours.append(estimate_jaccard(sig[0], sig[1]) - truth)
        # datasketch over the same shingles (their 64-bit values as bytes)
        m1, m2 = datasketch.MinHash(num_perm=128, seed=7), datasketch.MinHash(num_perm=128, seed=7)
        m1.update_batch([int(x).to_bytes(8, "little") for x in a])
        m2.update_batch([int(x).to_bytes(8, "little") for x in b])
        theirs.append(m1.jaccard(m2) - truth)
        # one standard error of a 128-permutation estimate is at most 0.045; allow 4 of them
        assert abs(ours[-1]) < 0.18
    mae_ours, mae_theirs = np.mean(np.abs(ours)), np.mean(np.abs(theirs))
    assert abs(np.mean(ours)) < 0.03  # unbiased
    assert mae_ours < mae_theirs + 0.015, (mae_ours, mae_theirs)


def test_band_keys_agree_exactly_when_bands_agree():
    sigs = np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9], [9, 9, 3, 4, 5, 6]], np.uint32)
    keys = band_keys(sigs, bands=2, rows=3)
    assert keys.shape == (3, 2) and keys.dtype == np.uint64
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] != keys[1, 1]
    assert keys[0, 1] == keys[2, 1] and keys[0, 0] != keys[2, 0]
    same_values = np.array([[7, 7, 7, 7]], np.uint32)
    k = band_keys(same_values, bands=2, rows=2)
    assert k[0, 0] != k[0, 1]  # the band index is part of the key
    with pytest.raises(ValueError):
        band_keys(sigs, bands=3, rows=3)


def test_lsh_params_reach_the_recall_at_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        assert candidate_probability(threshold, bands, rows) >= 0.99
    assert lsh_params(0.8, 128) == (21, 6)
    assert candidate_probability(0.3, *lsh_params(0.8, 128)) < 0.02  # few chance candidates far below
