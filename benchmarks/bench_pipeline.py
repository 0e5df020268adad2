"""Pipeline parallelism against data parallelism: the same model, seed and global batch, on two Ray nodes.

    python benchmarks/bench_pipeline.py                       # demo-size GPT, 40 steps
    python benchmarks/bench_pipeline.py --steps 6 --preset debug

Data: the bundled demo corpus (real English text), a byte-level BPE of 2,048 tokens trained on
it, packed into rows of --seq-len tokens (done here, without Ray). Cluster: two nodes of 2 CPUs
each, a real multi-host cluster (raylm.cluster.multihost: a head and a worker host in their own
network namespaces, talking TCP) when it can start here, otherwise `ray.cluster_utils.Cluster`
(two raylets on one host; a note says so). Both runs use pipeline_placement=spread, so both put
one worker on each node:

  - baseline: 2 data-parallel workers, micro-batch G/2, no accumulation (ZeRO 1);
  - pipeline: 2 stages x 1 data-parallel rank, micro-batch G/accum, `accum` micro-batches per
    step flowing through the stages (ZeRO 1).

Same global batch G and seed: both start from the same weights and, step by step, train on the
same sequences (the seeded order hands out the same rows per step), so their loss curves should
agree up to floating-point reduction order. Printed: the final train and validation loss of each
and their difference, tokens/s of each (the last logging window, evaluation excluded) and the
pipeline's ratio to the baseline. On a CPU the pipeline is expected to be slower: its two stages
work on different micro-batches only part of the time (the fill and drain bubbles), and
activations cross the network every micro-batch; its use is a model too large for one worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Ray Data's progress bars in the workers' streams (they take this process's DataContext) would bury the figures.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
from prepare_common import demo_texts  # noqa: E402  (the bundled corpus's texts)


def write_tokens(path: Path, seq_len: int) -> "object":
    """The demo corpus as packed token shards with a BPE trained on it; 5% of the documents for validation."""
    from tokenizers import ByteLevelBPETokenizer

    from raylm.artifacts import stage_output
    from raylm.tokenize.packing import packed_split
    from raylm.tokenize.shards import read_token_meta, write_token_data

    docs = demo_texts()
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(docs, vocab_size=2048, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  show_progress=False)  # fmt: skip
    eos = tokenizer.token_to_id("<|endoftext|>")
    cut = len(docs) - max(1, len(docs) // 20)
    with stage_output(path, "tokenize", {"bench": "pipeline", "seq_len": seq_len}) as out:
        splits = {
            split: packed_split((tokenizer.encode(d).ids for d in part), eos, seq_len)
            for split, part in (("train", docs[:cut]), ("validation", docs[cut:]))
        }
        out.stats = write_token_data(out.tmp, tokenizer, eos, splits, shard_rows=1024).to_stats()
    return read_token_meta(path)


@contextlib.contextmanager
def two_node_cluster(cpus_per_node: int):
    """Yields (Ray address, what kind of cluster): a multi-host cluster when possible, else cluster_utils."""
    try:
        from raylm.cluster.multihost import MultiHostCluster

        # The runs' storage is a local directory: the hosts share this disk (as NFS would).
        cluster = MultiHostCluster(num_workers=1, cpus_per_node=cpus_per_node, private_disks=False).start()
    except Exception as e:  # not importable, not root, no `ip`: fall back, and say so
        print(f"note: no multi-host cluster ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
              " using ray.cluster_utils.Cluster (two raylets on one host)", flush=True)  # fmt: skip
        from ray.cluster_utils import Cluster

        from raylm.runtime import local_system_config

        local = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "_system_config": local_system_config()})
        local.add_node(num_cpus=cpus_per_node)
        try:
            yield local.address, "ray.cluster_utils.Cluster (2 raylets, one host)"
        finally:
            local.shutdown()
        return
    try:
        os.environ.update(cluster.env)  # the cluster's address and auth token
        yield cluster.address, f"raylm multi-host cluster (head {cluster.head_ip}, worker host {cluster.worker_ips[0]})"
    finally:
        cluster.stop()


def run(train_cfg, name: str, storage: Path) -> dict:
    from raylm.train.trainer import build_trainer

    started = time.time()
    result = build_trainer(train_cfg, run_name=name, storage_path=str(storage / name), seed=0).fit()
    with result.checkpoint.as_directory() as d:
        history = json.loads((Path(d) / "state.json").read_text())["history"]
    m = result.metrics
    return {
        "loss": m["loss"],
        "val_loss": m["val_loss"],
        "tokens_per_s": m["tokens_per_s"],
        "seconds": time.time() - started,
        "losses": [round(h["loss"], 4) for h in history if "loss" in h],
        "stage_nodes": m.get("pipeline_stage_nodes"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="model size preset (demo: 4 blocks, 128 wide)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step (G)")
    parser.add_argument("--accum", type=int, default=4, help="pipeline micro-batches per step")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    args = parser.parse_args()
    if args.global_batch % 2 or args.global_batch % args.accum:
        parser.error("--global-batch must be even and a multiple of --accum")

    from raylm.train.config import TrainConfig

    with tempfile.TemporaryDirectory(prefix="raylm-bench-pipeline-") as tmp, two_node_cluster(args.cpus_per_node) as (
        address, kind,
    ):  # fmt: skip
        tmp = Path(tmp)
        meta = write_tokens(tmp / "tokens", args.seq_len)
        print(f"cluster: {kind}; data: {meta.num_sequences['train']} train rows of {args.seq_len} tokens,"
              f" vocab {meta.vocab_size}", flush=True)  # fmt: skip
        # imported only now: Ray reads the cluster's auth token (set by two_node_cluster) once, when it loads
        import ray

        from raylm.runtime import init_ray

        init_ray(address)
        logging.getLogger("ray").setLevel(logging.WARNING)
        common = dict(
            data=str(meta.path), output=str(tmp / "out"), model={"preset": args.preset}, num_workers=2, zero_stage=1,
            pipeline_placement="spread", max_steps=args.steps, log_interval_steps=max(1, args.steps // 4),
            eval_interval_steps=args.steps, checkpoint_interval_steps=args.steps, tensorboard=False,
            optimizer={"warmup_steps": max(1, args.steps // 10)},
        )  # fmt: skip
        # Validation reads the first eval_batches x micro x dp rows in file order: 4 G rows in both runs.
        base_cfg = TrainConfig(**common, micro_batch_size=args.global_batch // 2, grad_accum_steps=1, eval_batches=4)
        pipe_cfg = TrainConfig(**common, pipeline_stages=2, micro_batch_size=args.global_batch // args.accum,
                               grad_accum_steps=args.accum, eval_batches=4 * args.accum)  # fmt: skip
        base = run(base_cfg, "data-parallel", tmp / "ray")
        pipe = run(pipe_cfg, "pipeline", tmp / "ray")
        ray.shutdown()

    print(f"\n{args.preset} GPT, {args.steps} steps, global batch {args.global_batch} x {args.seq_len} tokens, seed 0")
    print(f"{'run':<34}{'train loss':>11}{'val loss':>10}{'tokens/s':>10}{'wall s':>8}")
    rows = (("data-parallel 2 x micro %d" % (args.global_batch // 2), base),
            ("pipeline 2 stages x micro %d x %d" % (args.global_batch // args.accum, args.accum), pipe))  # fmt: skip
    for label, r in rows:
        print(f"{label:<34}{r['loss']:>11.4f}{r['val_loss']:>10.4f}{r['tokens_per_s']:>10.0f}{r['seconds']:>8.1f}")
    print(f"difference (pipeline - baseline): train loss {pipe['loss'] - base['loss']:+.5f},"
          f" val loss {pipe['val_loss'] - base['val_loss']:+.5f}")  # fmt: skip
    print(f"tokens/s ratio pipeline / baseline: {pipe['tokens_per_s'] / base['tokens_per_s']:.2f}")
    print(f"loss curves (every {max(1, args.steps // 4)} steps): baseline {base['losses']}, pipeline {pipe['losses']}")
    print(f"pipeline stage -> node: {pipe['stage_nodes']}")


if __name__ == "__main__":
    main()
