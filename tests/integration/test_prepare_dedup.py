"""Fuzzy and exact dedup of the prepare stage on real text with planted near-duplicates.

Checks what a user relies on: the removed set equals the truth computed by exact pairwise
Jaccard, the kept ids do not depend on sharding, block size or partitioning, the report
names the clusters, and a run killed midway and started again gives the same output.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raylm import storage
from raylm.artifacts import read_manifest
from raylm.config import load_config
from raylm.data.filters import FILTER_NAMES
from raylm.data.minhash import jaccard, shingle_hashes
from raylm.stages import run_stage

THRESHOLD = 0.8
ASSETS = Path(__file__).resolve().parents[2] / "platform/raylm/assets/demo_corpus"
# Synthetic edits make odd texts; only the length filters stay on, so every document reaches dedup.
PERMISSIVE = [
    "prepare.filters.length.min_chars=50",
    "prepare.filters.word_count.min_words=20",
    *(f"prepare.filters.{name}.enabled=false" for name in FILTER_NAMES if name not in ("length", "word_count")),
]


def _real_texts() -> list[str]:
    """Documents of the bundled corpus, without its own planted copies (ids with `#`) and notes."""
    records = []
    for path in sorted(ASSETS.iterdir()):
        if path.suffix == ".parquet":
            records += pq.read_table(path, columns=["id", "text"]).to_pylist()
        elif ".jsonl" in path.name:
            raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
            records += [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    originals = [r for r in records if "#" not in r["id"] and "/" in r["id"] and not r["id"].startswith("note/")]
    return [r["text"] for r in sorted(originals, key=lambda r: r["id"]) if len(r["text"].split()) >= 120]


def _edit(words: list[str], rate: float, rng: random.Random) -> list[str]:
    """Copy `words` with about `rate` of them substituted, deleted or followed by an insertion."""
    out = []
    for w in words:
        r = rng.random()
        if r < rate / 3:
            out.append(rng.choice(words))  # substitution
        elif r < 2 * rate / 3:
            continue  # deletion
        elif r < rate:
            out += [w, rng.choice(words)]  # insertion
        else:
            out.append(w)
    return out


def planted_corpus(seed: int = 0) -> list[dict]:
    """~300 real documents, plus near copies far above and far below the threshold, chains and exact copies."""
    rng = random.Random(seed)
    texts = _real_texts()[:300]
    docs = [{"id": f"doc{i:04d}", "text": t} for i, t in enumerate(texts)]
    for i in range(0, 120, 3):
        words = texts[i].split()
        near = _edit(words, 0.01, rng)  # Jaccard about 0.9: a duplicate
        # Planted ids sort after "doc": the original is each cluster's smallest id, the one kept.
        docs.append({"id": f"p-near{i:04d}", "text": " ".join(near)})
        docs.append({"id": f"p-far{i:04d}", "text": " ".join(_edit(words, 0.12, rng))})  # about 0.3: not one
        if i % 2 == 0:  # a copy of the copy: a chain of three
            docs.append({"id": f"p-chain{i:04d}", "text": " ".join(_edit(near, 0.01, rng))})
        if i % 5 == 0:
            docs.append({"id": f"p-exact{i:04d}", "text": texts[i]})
    rng.shuffle(docs)
    return docs


def truth_removed(docs: list[dict], threshold: float = THRESHOLD) -> set[str]:
    """Every document of each connected component of the exact-Jaccard graph except its smallest id."""
    shingles = {d["id"]: shingle_hashes(d["text"], "word", 5) for d in docs}
    index: dict[int, list[str]] = {}
    for doc_id, hs in shingles.items():
        for h in hs.tolist():
            index.setdefault(h, []).append(doc_id)
    candidates = {tuple(sorted((a, b))) for ids in index.values() for a in ids for b in ids if a != b}
    parent = {d["id"]: d["id"] for d in docs}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in candidates:
        if jaccard(shingles[a], shingles[b]) >= threshold:
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)
    return {x for x in parent if find(x) != x}


def write_shards(docs: list[dict], root: Path, shards: int) -> Path:
    root.mkdir(parents=True)
    for s in range(shards):
        part = docs[s::shards]
        (root / f"part-{s:02d}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
    return root


def _cfg(corpus: Path, workdir: Path, *extra: str):
    return load_config(
        None,
        [f"prepare.input={corpus}", f"run.workdir={workdir}", "prepare.id_field=id",
         f"prepare.dedup.fuzzy.threshold={THRESHOLD}", *PERMISSIVE, *extra],
    )  # fmt: skip


def kept_ids(output: str) -> set[str]:
    return {i for split in ("train", "validation") for i in pq.read_table(Path(output) / split).column("id").to_pylist()}


@pytest.fixture(scope="module")
def corpus():
    docs = planted_corpus()
    return docs, truth_removed(docs)


@pytest.fixture(scope="module")
def one_run(ray_local, corpus, tmp_path_factory):
    docs, _ = corpus
    tmp = tmp_path_factory.mktemp("dedup")
    cfg = _cfg(write_shards(docs, tmp / "raw", 1), tmp / "run")
    return cfg, run_stage("prepare", cfg)


def test_removed_set_equals_exact_jaccard_truth(corpus, one_run):
    docs, truth = corpus
    cfg, result = one_run
    removed = {d["id"] for d in docs} - kept_ids(cfg.prepare.output)
    planted_near = {d["id"] for d in docs if d["id"].startswith(("p-near", "p-chain", "p-exact"))}
    # The truth is what the planted edits imply: near copies, chains and exact copies go, far edits stay.
    assert planted_near - truth == set()
    assert not any(i.startswith("p-far") for i in truth)
    assert removed == truth


def test_duplicate_files_and_stats(corpus, one_run):
    docs, truth = corpus
    cfg, result = one_run
    out = Path(cfg.prepare.output)
    exact = pq.read_table(out / "duplicates/exact").to_pylist()
    fuzzy = pq.read_table(out / "duplicates/fuzzy").to_pylist()
    assert {r["id"] for r in exact} | {r["id"] for r in fuzzy} == truth
    assert {r["id"] for r in exact} == {d["id"] for d in docs if d["id"].startswith("p-exact")}
    assert all(r["kept_id"] < r["id"] for r in fuzzy)  # the smallest id of a cluster is kept
    stats = result["stats"]
    fz = stats["dedup_fuzzy"]
    assert fz["removed"]["documents"] == len(fuzzy)
    assert fz["verified_pairs"] >= len(fuzzy)
    assert fz["candidate_pairs"] == fz["verified_pairs"] + fz["rejected_pairs"]
    # 40 planted clusters: 20 of two documents (doc, near) and 20 of three (doc, near, chain).
    assert fz["clusters"] == 40
    assert fz["cluster_sizes"] == {"2": 20, "3": 20}
    assert stats["dedup_exact"]["clusters"] == 8
    report = (out / "report.md").read_text()
    assert "Near duplicates: 60 removed in 40 clusters" in report
    assert "Exact duplicates: 8 removed in 8 clusters" in report


@pytest.mark.parametrize(
    "shards, extra",
    [
        (4, ["prepare.read_batch_docs=37", "prepare.dedup.partitions=7"]),
        (16, ["prepare.read_batch_docs=5", "prepare.dedup.partitions=16"]),
    ],
)
def test_kept_ids_do_not_depend_on_sharding(corpus, one_run, tmp_path, shards, extra):
    docs, _ = corpus
    cfg1, _ = one_run
    cfg = _cfg(write_shards(list(reversed(docs)), tmp_path / "raw", shards), tmp_path / "run", *extra)
    run_stage("prepare", cfg)
    assert kept_ids(cfg.prepare.output) == kept_ids(cfg1.prepare.output)
    for split in ("train", "validation"):
        ours = pq.read_table(Path(cfg.prepare.output) / split).to_pylist()
        theirs = pq.read_table(Path(cfg1.prepare.output) / split).to_pylist()
        assert ours == theirs  # same rows in the same order (by text hash)


def _rows(location: str) -> list[dict]:
    """The rows of a Parquet directory on a disk or an object store, in file order."""
    fs, inner = storage.filesystem(location)
    return pq.read_table(inner, filesystem=fs).to_pylist()


@pytest.mark.slow  # two prepare jobs as subprocesses, one killed midway: ~2.5 minutes on 2 cores, each
@pytest.mark.parametrize("where", ["disk", "s3"])
def test_killed_run_resumes_to_the_same_output(where, ray_local, corpus, one_run, tmp_path, repo_root, request):
    """Killed after its exact-dedup checkpoint, a prepare started again reuses the finished steps and writes what an
    uninterrupted run writes; on an object store the checkpoints and the output are there, not on the local disk."""
    docs, _ = corpus
    cfg1, _ = one_run
    corpus_dir = write_shards(docs, tmp_path / "raw", 4)
    workdir = str(tmp_path / "run") if where == "disk" else f"{request.getfixturevalue('s3_bucket')}/run"
    args = [sys.executable, str(repo_root / "jobs/prepare.py"), "--config", str(repo_root / "configs/demo.yaml"),
            f"--prepare.input={corpus_dir}", f"--run.workdir={workdir}", "--prepare.id_field=id",
            f"--prepare.dedup.fuzzy.threshold={THRESHOLD}", *(f"--{o}" for o in PERMISSIVE)]  # fmt: skip
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    output = storage.join(workdir, "prepared")
    marker = f"{output}.work/exact.done.json"
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not storage.is_file(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert storage.is_file(marker), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no checkpoint in 300 s"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_manifest(output) is None  # nothing that looks finished

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "step documents already done" in again.stderr and "step exact already done" in again.stderr
    assert not storage.exists(f"{output}.work")
    for split in ("train", "validation"):
        assert _rows(storage.join(output, split)) == _rows(f"{cfg1.prepare.output}/{split}")
    if where == "s3":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # nothing of the run on the local disk


@pytest.mark.slow  # a prepare job on a second local Ray of its own: ~1 minute on 2 cores
def test_kept_ids_do_not_depend_on_the_worker_count(corpus, one_run, tmp_path, repo_root):
    """The same corpus on a separate local Ray with 2 CPUs (half the workers of the shared one) keeps the same ids."""
    docs, _ = corpus
    cfg1, _ = one_run
    corpus_dir = write_shards(docs, tmp_path / "raw", 3)
    workdir = tmp_path / "run"
    args = [sys.executable, str(repo_root / "jobs/prepare.py"), "--config", str(repo_root / "configs/demo.yaml"),
            f"--prepare.input={corpus_dir}", f"--run.workdir={workdir}", "--prepare.id_field=id", "--ray.num_cpus=2",
            f"--prepare.dedup.fuzzy.threshold={THRESHOLD}", *(f"--{o}" for o in PERMISSIVE)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert kept_ids(str(workdir / "prepared")) == kept_ids(cfg1.prepare.output)
