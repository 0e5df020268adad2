"""The distill stage on a local Ray: a small student learns from a frozen teacher on 2 DeepSpeed workers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from raylm.artifacts import stage_output
from raylm.config import load_config
from raylm.model.artifact import load_model, save_model
from raylm.model.gpt import GPT, build_config
from raylm.tokenize.packing import packed_split
from raylm.tokenize.shards import TokenMeta, read_token_meta, write_token_data
from raylm.stages import run_stage

SEQ_LEN = 32


def make_token_data(path: Path) -> TokenMeta:
    """Byte-level BPE token shards of a small made-up corpus (as in test_train.py)."""
    from tokenizers import ByteLevelBPETokenizer

    rng = random.Random(1)
    words = ["the cat", "a dog", "sat on", "looked at", "the mat", "a tree", "the sea", "the moon"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 30))) + "." for _ in range(300)]
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        docs, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
    )
    eos = tokenizer.token_to_id("<|endoftext|>")
    with stage_output(path, "tokenize", {"test": "distill"}) as out:
        splits = {
            split: packed_split((tokenizer.encode(doc).ids for doc in part), eos, SEQ_LEN)
            for split, part in (("train", docs[:270]), ("validation", docs[270:]))
        }
        out.stats = write_token_data(out.tmp, tokenizer, eos, splits).to_stats()
    return read_token_meta(path)


def test_student_learns_from_teacher_and_exports(ray_local, tmp_path):
    tokens = make_token_data(tmp_path / "tokens")
    torch.manual_seed(0)
    teacher = GPT(build_config("debug", vocab_size=tokens.vocab_size, block_size=64))
    with torch.no_grad():  # a random teacher with confident (far from uniform) next-token distributions
        teacher.wte.weight.mul_(20.0)  # tied with lm_head: logits of std ~3 instead of ~0.2
    save_model(tmp_path / "teacher", teacher, tokens.tokenizer_file, eos_token_id=tokens.eos_token_id)

    cfg = load_config(
        None,
        [
            "--prepare.input=unused",
            f"--run.workdir={tmp_path}",
            "--run.name=unit",
            f"--tokenize.output={tokens.path}",
            f"--distill.teacher={tmp_path / 'teacher'}",
            "--distill.student.preset=debug",
            "--distill.student.n_layer=1",
            "--distill.student.d_model=32",
            "--distill.student.positions=rotary",  # a LLaMA-style student of a GPT-2-style teacher
            "--distill.student.mlp=swiglu",
            "--distill.temperature=2.0",
            "--distill.alpha=0.9",
            "--distill.micro_batch_size=4",
            "--distill.max_steps=10",
            "--distill.optimizer.warmup_steps=2",
            "--distill.log_interval_steps=2",
            "--distill.eval_interval_steps=10",
            "--distill.checkpoint_interval_steps=10",
            "--distill.eval_batches=2",
        ],
    )
    summary = run_stage("distill", cfg)

    out = Path(cfg.distill.output)
    assert summary["steps"] == 10 and math.isfinite(summary["loss"]) and math.isfinite(summary["val_loss"])
    history = json.loads((out / "metrics.json").read_text())["history"]
    logged = [h for h in history if "loss" in h]
    assert {"kl", "ce"} <= set(logged[0])
    assert logged[-1]["loss"] < logged[0]["loss"]  # the student moves toward the teacher
    assert logged[-1]["kl"] < logged[0]["kl"]

    student = load_model(out / "model")
    assert student.config.n_layer == 1 and student.config.d_model == 32
    assert (student.config.positions, student.config.mlp) == ("rotary", "swiglu")
    assert student.config.vocab_size == teacher.config.vocab_size  # the teacher's vocabulary
    assert student.config.block_size == 64  # and block size
    assert summary["num_params"] < summary["teacher_params"] == teacher.num_params(non_embedding=False)
    assert student.meta["distilled_from"] == str((tmp_path / "teacher").resolve())
    assert summary["export_max_abs_diff"] < 1e-5
    assert (out / "loss_curve.png").exists()
