"""The tune stage on a local Ray: a tiny OptunaSearch + ASHA sweep, each trial a real Ray Train + DeepSpeed run."""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raylm.artifacts import stage_output
from raylm.config import load_config
from raylm.tokenize.packing import packed_split
from raylm.tokenize.shards import write_token_data
from raylm.stages import run_stage

SEQ_LEN = 32
WORDS = "the a king queen knight sword castle river rides sees holds crosses under over near bright dark old".split()


def corpus(num_sentences: int, seed: int = 0) -> list[str]:
    """Short sentences over a small vocabulary: enough structure that a few steps lower the loss."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9))) + "." for _ in range(num_sentences)]


def make_tokens(root) -> str:
    """A finished tokenize output: a real byte-level BPE tokenizer and packed train/validation shards."""
    texts = corpus(1200)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    eos = tok.token_to_id("<|endoftext|>")
    n_val = max(16, len(texts) // 10)
    path = root / "tokens"
    with stage_output(path, "tokenize", {"test": "tune"}) as out:
        splits = {
            split: packed_split((tok.encode(text).ids for text in part), eos, SEQ_LEN)
            for split, part in (("train", texts[n_val:]), ("validation", texts[:n_val]))
        }
        out.stats = write_token_data(out.tmp, tok, eos, splits).to_stats()
    return str(path)


RUN_YAML = """\
run: {{name: tunetest, workdir: {root}}}
prepare: {{input: x}}
train:
  data: {tokens}
  model: {{preset: debug}}
  num_workers: 2
  micro_batch_size: 8
  max_steps: 500
  eval_batches: 2
  tensorboard: false
tune:
  num_samples: 3
  max_concurrent_trials: 2
  max_steps_per_trial: 8
  num_workers_per_trial: 1
  evals_per_trial: 4
  tpe_startup_trials: 2
  grace_period: 1
  reduction_factor: 2
  search_space:
    optimizer.lr: {{type: loguniform, low: 1.0e-4, high: 3.0e-2}}
    optimizer.warmup_steps: {{type: int, low: 0, high: 4}}
    micro_batch_size: {{type: choice, values: [4, 8]}}
"""


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    config_file = root / "run.yaml"
    config_file.write_text(RUN_YAML.format(root=root, tokens=make_tokens(root)))
    cfg = load_config(config_file)
    return cfg, run_stage("tune", cfg)


def test_leaderboard_has_a_ranked_row_per_trial(swept):
    cfg, summary = swept
    assert summary["num_trials"] == 3 and summary["num_errors"] == 0
    with open(f"{cfg.tune.output}/leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    assert len({r["trial_id"] for r in rows}) == 3
    for r in rows:
        assert 1e-4 <= float(r["optimizer.lr"]) <= 3e-2
        assert int(r["optimizer.warmup_steps"]) in range(5)
        assert int(r["micro_batch_size"]) in (4, 8)
        steps, stopped = int(r["steps"]), r["stopped_early"] == "True"
        assert 2 <= steps <= 8 and stopped == (steps < 8)
        assert float(r["best_val_loss"]) <= float(r["final_val_loss"])
    finals = [float(r["final_val_loss"]) for r in rows if r["stopped_early"] == "False"]
    assert finals == sorted(finals)
    assert rows[0]["trial_id"] == summary["best_trial"]
    assert summary["num_stopped_early"] == sum(r["stopped_early"] == "True" for r in rows)

    board = json.loads(open(f"{cfg.tune.output}/leaderboard.json").read())
    assert [t["trial_id"] for t in board["trials"]] == [r["trial_id"] for r in rows]
    for t in board["trials"]:  # one report per eval interval (2 steps), as many as the trial ran
        assert [step for step, _ in t["curve"]] == list(range(2, t["steps"] + 1, 2))
        assert (t["checkpoint"] is not None) == (t["steps"] == 8)
    # the best trial's final checkpoint holds its exported model
    assert (Path(summary["best_checkpoint"]) / "model" / "config.json").is_file()


def test_best_config_loads_with_the_best_params_and_full_length_training(swept):
    cfg, summary = swept
    best = load_config(summary["best_config"])
    assert best.train.optimizer.lr == pytest.approx(summary["best_params"]["optimizer.lr"])
    assert best.train.optimizer.warmup_steps == summary["best_params"]["optimizer.warmup_steps"]
    assert best.train.micro_batch_size == summary["best_params"]["micro_batch_size"]
    # the trial's short length and single worker stay in the sweep; the rest of the run config is kept
    assert (best.train.max_steps, best.train.num_workers) == (500, 2)
    assert best.train.data == cfg.train.data and best.tune == cfg.tune and best.serve == cfg.serve


def test_sweep_plot_and_manifest_are_written_and_a_rerun_is_a_no_op(swept):
    cfg, summary = swept
    png = open(summary["sweep_plot"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    manifest = json.loads(open(f"{cfg.tune.output}/manifest.json").read())
    assert manifest["stage"] == "tune" and manifest["stats"]["best_trial"] == summary["best_trial"]
    again = run_stage("tune", cfg)
    assert again["best_trial"] == summary["best_trial"] and again["output"] == summary["output"]


def test_sweep_leaves_the_cluster_cpus_free(swept):
    import ray

    # Trials ASHA stopped had their Train workers' placement groups released.
    for _ in range(20):
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            break
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
