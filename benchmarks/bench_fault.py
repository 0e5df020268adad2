"""What a worker crash costs: a train run with one Ray Train worker SIGKILLed at a random (seeded) step, against
the same run uninterrupted.

    python benchmarks/bench_fault.py                       # debug model, 60 steps, checkpoint every 10
    python benchmarks/bench_fault.py --steps 200 --checkpoint-steps 25 --preset demo --seed 3

Both runs: 2 CPU workers (gloo), ZeRO 1, the bundled demo corpus tokenized with a small BPE, the same seed,
so the same data order. The faulted run has max_failures=1; from this process, once rank 0 has logged the
chosen step (TensorBoard, flushed every log line), one worker process (found through Ray's state API) is
killed with SIGKILL. Ray Train restarts the worker group, which resumes from the latest checkpoint.

Printed: the final training and validation loss of both runs and their difference, the step of the kill,
the step resumed from and the steps lost, both wall times, and the restart overhead: the faulted run's
extra wall time, and that time less the re-trained steps (detection, new workers, DeepSpeed reload).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Ray Data's progress bars in the workers' streams (they take this process's DataContext) would bury the figures.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
from prepare_common import demo_texts  # noqa: E402  (the bundled corpus's texts)


def make_tokens(path: Path, seq_len: int):
    """Packed token shards of the demo corpus with a 1,024-token byte-level BPE."""
    from tokenizers import ByteLevelBPETokenizer

    from raylm.artifacts import stage_output
    from raylm.tokenize.packing import packed_split
    from raylm.tokenize.shards import read_token_meta, write_token_data

    docs = demo_texts()
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(docs, vocab_size=1024, special_tokens=["<|endoftext|>"], show_progress=False)
    eos = tokenizer.token_to_id("<|endoftext|>")
    cut = int(len(docs) * 0.95)
    with stage_output(path, "tokenize", {"bench": "fault"}) as out:
        splits = {
            split: packed_split((tokenizer.encode(d).ids for d in part), eos, seq_len)
            for split, part in (("train", docs[:cut]), ("validation", docs[cut:]))
        }
        out.stats = write_token_data(out.tmp, tokenizer, eos, splits, shard_rows=256).to_stats()
    return read_token_meta(path)


def last_logged_step(tensorboard_dir: Path) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.exists():
        return 0
    acc = EventAccumulator(str(tensorboard_dir))
    acc.Reload()
    return max((e.step for e in acc.Scalars("train/loss")), default=0) if "train/loss" in acc.Tags()["scalars"] else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoint-steps", type=int, default=10)
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="picks the kill step and the worker")
    args = parser.parse_args()

    import ray
    from ray.util.state import list_actors

    from raylm.runtime import init_ray
    from raylm.train.config import TrainConfig
    from raylm.train.trainer import build_trainer

    rng = random.Random(args.seed)
    kill_step = rng.randint(args.checkpoint_steps + 1, args.steps - 5)
    init_ray(num_cpus=4)
    root = Path(tempfile.mkdtemp(prefix="raylm-bench-fault-"))
    tokens = make_tokens(root / "tokens", args.seq_len)
    cfg = TrainConfig(
        data=str(tokens.path), output=str(root / "unused"), model={"preset": args.preset}, num_workers=2,
        zero_stage=1, micro_batch_size=8, max_steps=args.steps, log_interval_steps=1, eval_interval_steps=10**6,
        eval_batches=2, checkpoint_interval_steps=args.checkpoint_steps, optimizer={"warmup_steps": 5},
    )  # fmt: skip

    started = time.perf_counter()
    steady = build_trainer(cfg, run_name="steady", storage_path=str(root / "steady")).fit().metrics
    steady_s = time.perf_counter() - started

    faulted_cfg = cfg.model_copy(update={"max_failures": 1})
    trainer = build_trainer(faulted_cfg, run_name="faulted", storage_path=str(root / "faulted"))
    outcome: dict = {}
    started = time.perf_counter()
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
    thread.start()
    tb = root / "faulted" / "faulted" / "tensorboard"
    while thread.is_alive() and last_logged_step(tb) < kill_step:
        time.sleep(0.05)
    killed_at = last_logged_step(tb)
    workers = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])  # fmt: skip
    victim = rng.choice(sorted(a.pid for a in workers))
    os.kill(victim, signal.SIGKILL)
    thread.join()
    faulted_s = time.perf_counter() - started
    faulted = outcome["result"].metrics

    lost = killed_at - faulted["start_step"]
    step_s = steady["step_time_s"]
    figures = {
        "steps": args.steps,
        "checkpoint_interval_steps": args.checkpoint_steps,
        "kill_step": killed_at,
        "resumed_from_step": faulted["start_step"],
        "steps_lost": lost,
        "steps_lost_within_one_interval": 0 <= lost <= args.checkpoint_steps,
        "loss_uninterrupted": steady["loss"],
        "loss_faulted": faulted["loss"],
        "loss_diff": faulted["loss"] - steady["loss"],
        "val_loss_uninterrupted": steady["val_loss"],
        "val_loss_faulted": faulted["val_loss"],
        "same_samples": faulted["sample_checksum"] == steady["sample_checksum"],
        "wall_s_uninterrupted": round(steady_s, 2),
        "wall_s_faulted": round(faulted_s, 2),
        "restart_overhead_s": round(faulted_s - steady_s, 2),
        "restart_overhead_less_retrained_steps_s": round(faulted_s - steady_s - lost * step_s, 2),
        "ratio_wall_faulted_to_uninterrupted": round(faulted_s / steady_s, 3),
    }
    print(json.dumps(figures, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
