"""Benchmark of the prepare stage: dedup quality, throughput and scaling, against datasketch in the same run.

    python benchmarks/bench_prepare.py                       # quality at 3,000 base docs; scaling at 1x, 2x, 4x of 4,000
    python benchmarks/bench_prepare.py --base 8000 --quality-base 5000
    python benchmarks/bench_prepare.py --warm-only --scales 1,16   # on a running Ray, after a warm-up run

For each corpus (see prepare_common.py): `raylm prepare` runs as its own process with its own
local Ray (so its time includes starting Ray, as a user's run does), its peak memory is the
resident memory of that process and all its descendants; the baseline is a single-process
datasketch MinHashLSH pipeline over the same documents, the same 5-word shingles and the same
threshold. Both removed sets are scored against the exact-Jaccard truth. Figures are printed
and written to benchmarks/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_common import (NUM_PERM, PREPARE_OVERRIDES, ROOT, THRESHOLD, PeakMemory, build_corpus,  # noqa: E402
                            datasketch_dedup, edit, raylm_removed, scores, shingle_sets, truth, write_shards)  # fmt: skip

from raylm.config import load_config  # noqa: E402
from raylm.data.minhash import MinHasher, estimate_jaccard, jaccard, shingle_hashes, words  # noqa: E402
from raylm.runtime import init_ray  # noqa: E402
from raylm.stages import run_stage  # noqa: E402


def run_raylm_prepare(corpus_dir: Path, workdir: Path) -> dict:
    """`raylm prepare` in a fresh process: wall seconds, peak RSS of its process tree, its stats."""
    cmd = [sys.executable, "-m", "raylm.cli", "prepare", "--config", str(ROOT / "configs/demo.yaml"),
           f"--prepare.input={corpus_dir}", f"--run.workdir={workdir}", *(f"--{o}" for o in PREPARE_OVERRIDES)]  # fmt: skip
    started = time.perf_counter()
    log = open(workdir.parent / f"{workdir.name}.log", "w+")  # a file, not a pipe: a full pipe would stall it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    peak, parent = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        try:
            for p in [parent, *parent.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.25)
    seconds = time.perf_counter() - started
    log.seek(0)
    err = log.read()
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"raylm prepare failed ({proc.returncode}):\n{err[-3000:]}")
    stats = json.loads((workdir / "prepared/stats.json").read_text())
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20, "stats": stats, "output": workdir / "prepared"}


def minhash_crosscheck(corpus: list[dict], pairs: int = 300, seed: int = 3) -> dict:
    """Mean absolute error of raylm's and datasketch's MinHash estimates against exact Jaccard.

    Pairs: a base document of the corpus and a copy edited at a rate from 1% to 20% (Jaccard 0.2-0.95).
    """
    from datasketch import MinHash  # a test extra, and only this baseline needs it

    rng = random.Random(seed)
    hasher = MinHasher(NUM_PERM, seed=42)
    bases = [d["text"] for d in corpus if d["id"].startswith("b")]
    ours, theirs = [], []
    for _ in range(pairs):
        a = rng.choice(bases)
        b = " ".join(edit(a.split(), rng.choice([0.01, 0.03, 0.05, 0.1, 0.2]), rng))
        sa, sb = shingle_hashes(a, "word", 5), shingle_hashes(b, "word", 5)
        exact = jaccard(sa, sb)
        sig = hasher.signatures([sa, sb])
        ours.append(abs(estimate_jaccard(sig[0], sig[1]) - exact))
        sketches = []
        for text in (a, b):
            ws = words(text)
            m = MinHash(num_perm=NUM_PERM)
            m.update_batch([" ".join(ws[i : i + 5]).encode() for i in range(max(1, len(ws) - 4))])
            sketches.append(m)
        theirs.append(abs(sketches[0].jaccard(sketches[1]) - exact))
    return {"pairs": pairs, "raylm_mae": float(np.mean(ours)), "datasketch_mae": float(np.mean(theirs))}


def run_warm(sizes: list[int], tmp: Path) -> list[dict]:
    """The stage on an already running local Ray (as on a cluster that `raylm submit` targets), after one warm-up run.

    Only the stage's own time is measured: no Ray start, no cold worker processes.
    """
    init_ray(num_cpus=4)  # the running Ray every run_stage below connects to
    rows = []
    for i, base in enumerate([300, *sizes]):  # the first, small corpus only warms the workers up
        corpus = build_corpus(base, seed=2)
        corpus_dir = write_shards(corpus, tmp / f"warm-corpus-{base}", shards=8)
        cfg = load_config(ROOT / "configs/demo.yaml",
                          [f"prepare.input={corpus_dir}", f"run.workdir={tmp / f'warm-run-{base}'}", *PREPARE_OVERRIDES])  # fmt: skip
        with PeakMemory() as mem:
            started = time.perf_counter()
            stats = run_stage("prepare", cfg)["stats"]
            seconds = time.perf_counter() - started
        if i == 0:
            continue
        base_removed, base_seconds = datasketch_dedup(corpus)
        true_removed, _ = truth(corpus, shingle_sets(corpus))
        rows.append({"documents": len(corpus), "mb": sum(len(d["text"].encode()) for d in corpus) / 1e6,
                     "raylm_seconds": seconds, "raylm_fuzzy_seconds": stats["seconds"]["dedup_fuzzy"],
                     "peak_rss_mb": mem.peak / 2**20, "datasketch_seconds": base_seconds,
                     "raylm": scores(raylm_removed(cfg.prepare.output), true_removed),
                     "datasketch": scores(base_removed, true_removed)})  # fmt: skip
    return rows


def measure(base: int, seed: int, tmp: Path, with_truth: bool = True) -> dict:
    corpus = build_corpus(base, seed)
    mb = sum(len(d["text"].encode()) for d in corpus) / 1e6
    corpus_dir = write_shards(corpus, tmp / f"corpus-{base}-{seed}", shards=8)
    ours = run_raylm_prepare(corpus_dir, tmp / f"run-{base}-{seed}")
    base_removed, base_seconds = datasketch_dedup(corpus)
    row = {
        "documents": len(corpus),
        "mb": mb,
        "raylm_seconds": ours["seconds"],
        "raylm_fuzzy_seconds": ours["stats"]["seconds"]["dedup_fuzzy"],
        "raylm_peak_rss_mb": ours["peak_rss_mb"],
        "datasketch_seconds": base_seconds,
        "fuzzy_stats": {k: ours["stats"]["dedup_fuzzy"][k] for k in ("candidate_pairs", "verified_pairs", "rejected_pairs",
                                                                      "clusters", "iterations", "lsh")},  # fmt: skip
    }
    if with_truth:
        shingles = shingle_sets(corpus)
        true_removed, scored = truth(corpus, shingles)
        row["truth_pairs_scored"] = scored
        row["raylm"] = scores(raylm_removed(ours["output"]), true_removed)
        row["datasketch"] = scores(base_removed, true_removed)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quality-base", type=int, default=3000, help="base documents of the quality corpus")
    parser.add_argument("--base", type=int, default=4000, help="base documents at 1x for throughput and scaling")
    parser.add_argument("--scales", default="1,2,4")
    parser.add_argument("--warm-only", action="store_true", help="only the warm-cluster throughput rows")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    if args.warm_only:
        with tempfile.TemporaryDirectory(prefix="raylm-bench-") as tmp:
            rows = run_warm([args.base * s for s in scales], Path(tmp))
        print("\n== throughput on a running Ray (warm workers; whole stage) vs datasketch (1 process) ==")
        print(f"{'docs':>8} {'MB':>6} {'raylm s':>8} {'docs/s':>7} {'MB/s':>5} {'fuzzy s':>7} {'peak MB':>8} "
              f"{'datasketch s':>12} {'docs/s':>7} {'speed ratio':>11} {'F1 raylm':>8} {'F1 ds':>6}")  # fmt: skip
        for r in rows:
            print(f"{r['documents']:>8,} {r['mb']:6.1f} {r['raylm_seconds']:8.1f} {r['documents'] / r['raylm_seconds']:7.0f} "
                  f"{r['mb'] / r['raylm_seconds']:5.2f} {r['raylm_fuzzy_seconds']:7.1f} {r['peak_rss_mb']:8.0f} "
                  f"{r['datasketch_seconds']:12.1f} {r['documents'] / r['datasketch_seconds']:7.0f} "
                  f"{r['datasketch_seconds'] / r['raylm_seconds']:11.2f} {r['raylm']['f1']:8.4f} {r['datasketch']['f1']:6.4f}")  # fmt: skip
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        (out / "prepare_warm.json").write_text(json.dumps(rows, indent=2))
        return
    results: dict = {"threshold": THRESHOLD, "num_perm": NUM_PERM}
    with tempfile.TemporaryDirectory(prefix="raylm-bench-") as tmp:
        tmp = Path(tmp)
        q = measure(args.quality_base, seed=1, tmp=tmp)
        q["minhash_crosscheck"] = minhash_crosscheck(build_corpus(args.quality_base, 1))
        results["quality"] = q
        print(f"\n== dedup quality ({q['documents']:,} documents, {q['mb']:.1f} MB, threshold {THRESHOLD}) ==")
        print(f"{'':12} {'precision':>9} {'recall':>7} {'F1':>6} {'removed':>8} {'truth':>6}")
        for name in ("raylm", "datasketch"):
            s = q[name]
            print(f"{name:12} {s['precision']:9.4f} {s['recall']:7.4f} {s['f1']:6.4f} {s['removed']:8,} {s['true_removed']:6,}")
        c = q["minhash_crosscheck"]
        print(f"MinHash estimate vs exact Jaccard, mean abs error over {c['pairs']} pairs: "
              f"raylm {c['raylm_mae']:.4f}, datasketch {c['datasketch_mae']:.4f}")  # fmt: skip

        results["scaling"] = []
        for scale in scales:
            row = measure(args.base * scale, seed=2, tmp=tmp)
            row["scale"] = scale
            results["scaling"].append(row)
        print("\n== throughput and scaling (raylm prepare, whole stage, 2 cores; baseline: datasketch, 1 process) ==")
        print(f"{'scale':>5} {'docs':>8} {'MB':>6} {'raylm s':>8} {'docs/s':>7} {'MB/s':>5} {'fuzzy s':>7} {'peak MB':>8}"
              f" {'datasketch s':>12} {'docs/s':>7} {'speed ratio':>11} {'F1 raylm':>8} {'F1 ds':>6}")  # fmt: skip
        for r in results["scaling"]:
            ratio = r["datasketch_seconds"] / r["raylm_seconds"]
            r["speed_ratio_vs_datasketch"] = ratio
            print(f"{r['scale']:>5} {r['documents']:>8,} {r['mb']:6.1f} {r['raylm_seconds']:8.1f} "
                  f"{r['documents'] / r['raylm_seconds']:7.0f} {r['mb'] / r['raylm_seconds']:5.2f} {r['raylm_fuzzy_seconds']:7.1f} "
                  f"{r['raylm_peak_rss_mb']:8.0f} {r['datasketch_seconds']:12.1f} {r['documents'] / r['datasketch_seconds']:7.0f} "
                  f"{ratio:11.2f} {r['raylm']['f1']:8.4f} {r['datasketch']['f1']:6.4f}")  # fmt: skip
        first = results["scaling"][0]
        for r in results["scaling"][1:]:
            print(f"{r['scale']}x corpus: time x{r['raylm_seconds'] / first['raylm_seconds']:.2f}, "
                  f"peak memory x{r['raylm_peak_rss_mb'] / first['raylm_peak_rss_mb']:.2f}")  # fmt: skip
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "prepare.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nfigures: {out / 'prepare.json'}")


if __name__ == "__main__":
    main()
