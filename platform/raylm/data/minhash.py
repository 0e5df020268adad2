"""MinHash signatures and LSH banding, vectorized with numpy over whole batches of documents.

Shingles. Word unit: the text lower-cased, every character that is not a letter, digit or
whitespace turned into a space, split into words; shingles are the word n-grams. Char unit:
the text lower-cased with whitespace runs collapsed to one space; shingles are character
n-grams. A document shorter than n units is one shingle. Shingles are 64-bit hashes built from
BLAKE2b hashes of the units, so they are the same in every process and on every run.

MinHash. Permutation j maps a shingle x to the top 32 bits of `a_j * x + b_j` modulo 2^64, with
odd random multipliers a_j (multiply-shift hashing); a document's signature is the minimum
over its shingles of each permutation. Two documents agree at one signature position with
probability about their Jaccard similarity.

LSH. The first bands × rows positions are cut into bands; a band key hashes the band index
and its rows, so documents sharing a key agree on a whole band. Pairs of Jaccard similarity s
share at least one key with probability 1 - (1 - s^rows)^bands.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_NOT_WORD = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")
_MASK32 = np.uint64(0xFFFFFFFF)
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd: the n-gram combination step
_EMPTY = np.zeros(0, dtype=np.uint64)
_word_cache: dict[str, int] = {}
_WORD_CACHE_MAX = 1 << 20


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64: a bijection that spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _word_hash(word: str) -> int:
    h = _word_cache.get(word)
    if h is None:
        h = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        if len(_word_cache) >= _WORD_CACHE_MAX:
            _word_cache.clear()
        _word_cache[word] = h
    return h


def words(text: str) -> list[str]:
    """The word units of a text: lower-cased, punctuation and symbols removed."""
    return _NOT_WORD.sub(" ", text.lower()).split()


def _ngrams(units: np.ndarray, ngram: int) -> np.ndarray:
    """Sorted unique 64-bit hashes of the n-grams of a sequence of unit hashes (one shingle if shorter)."""
    m = len(units)
    if m == 0:
        return _EMPTY
    n = min(ngram, m)
    count = m - n + 1
    acc = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc = acc * _POLY + units[k : k + count]
    return np.unique(mix64(acc + np.uint64(n)))


def shingle_hashes(text: str, unit: str = "word", ngram: int = 5) -> np.ndarray:
    """Sorted unique uint64 hashes of the document's shingles (see the module docstring)."""
    if unit == "word":
        units = np.fromiter((_word_hash(w) for w in words(text)), dtype=np.uint64)
    elif unit == "char":
        normalized = _SPACES.sub(" ", text.lower()).strip()
        units = mix64(np.frombuffer(normalized.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64) + _POLY)
    else:
        raise ValueError(f"unit must be 'word' or 'char', not {unit!r}")
    return _ngrams(units, ngram)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity |a ∩ b| / |a ∪ b| of two sorted unique arrays (0 when both are empty)."""
    if len(a) == 0 and len(b) == 0:
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class MinHasher:
    """`num_perm` multiply-shift hash functions drawn from `seed`; signatures of whole batches at once."""

    def __init__(self, num_perm: int, seed: int, chunk_elements: int = 1 << 22):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.chunk_elements = chunk_elements
        """Most shingle × permutation values computed at once: bounds the memory (32 MiB of uint64)."""
        self._buffer: np.ndarray | None = None

    def signatures(self, shingles: list[np.ndarray]) -> np.ndarray:
        """(n, num_perm) uint32 signatures. A document without shingles gets all 0xFFFFFFFF (skip it for LSH)."""
        out = np.full((len(shingles), self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        per_chunk = max(1, self.chunk_elements // self.num_perm)
        start = 0
        while start < len(shingles):
            # Documents [start, end) whose shingles together fit in one chunk (at least one document).
            end, total = start, 0
            while end < len(shingles) and (end == start or total + len(shingles[end]) <= per_chunk):
                total += len(shingles[end])
                end += 1
            self._fill(shingles[start:end], out[start:end])
            start = end
        return out

    def _fill(self, docs: list[np.ndarray], out: np.ndarray) -> None:
        lengths = np.array([len(d) for d in docs])
        nonempty = np.flatnonzero(lengths)
        if len(nonempty) == 0:
            return
        flat = np.concatenate([docs[i] for i in nonempty])
        # In place, in one reused (num_perm, shingles) buffer: fresh temporaries of this size cost
        # more in page faults than the arithmetic, and a reduction along rows is contiguous.
        if self._buffer is None or self._buffer.size < self.num_perm * len(flat):
            self._buffer = np.empty(self.num_perm * max(len(flat), self.chunk_elements // self.num_perm), np.uint64)
        values = self._buffer[: self.num_perm * len(flat)].reshape(self.num_perm, len(flat))
        np.multiply(self.a[:, None], flat[None, :], out=values)
        np.add(values, self.b[:, None], out=values)
        np.right_shift(values, np.uint64(32), out=values)
        offsets = np.r_[0, np.cumsum(lengths[nonempty])[:-1]]
        out[nonempty] = np.minimum.reduceat(values, offsets, axis=1).T


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The MinHash estimate of Jaccard similarity: the fraction of positions where two signatures agree."""
    return float(np.mean(sig_a == sig_b))


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 keys: equal keys mean the same band index and the same `rows` signature values."""
    n = signatures.shape[0]
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands × rows = {bands * rows} exceeds the signature length {signatures.shape[1]}")
    cut = signatures[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    acc = np.broadcast_to(np.arange(bands, dtype=np.uint64) + np.uint64(1), (n, bands)).copy()
    with np.errstate(over="ignore"):
        for r in range(rows):
            acc = mix64(acc * _POLY + cut[:, :, r])
    return acc


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """Probability that a pair of Jaccard similarity `s` shares at least one band key."""
    return 1.0 - (1.0 - s**rows) ** bands


def lsh_params(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows) for a Jaccard threshold: pairs at the threshold become candidates with probability ≥ `recall`.

    Among the shapes that reach `recall` at the threshold, the one with the most rows per band
    (fewest chance candidates below the threshold, which verification would reject at a cost)
    wins; if none reaches it, the one with the highest probability. Examples with 128
    permutations: threshold 0.8 gives 21 × 6 (0.998 at 0.8, 0.27 at 0.5); 0.7 gives 32 × 4
    (0.9998 at 0.7); 0.5 gives 42 × 3 (0.996 at 0.5).
    """
    best, best_p = (num_perm, 1), -1.0
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        p = candidate_probability(threshold, bands, rows)
        if p >= recall:
            return bands, rows
        if p > best_p:
            best, best_p = (bands, rows), p
    return best
