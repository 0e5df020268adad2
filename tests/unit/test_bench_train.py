"""The train benchmark's own arithmetic and data preparation (benchmarks/train_common.py), without Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from train_common import (  # noqa: E402
    CpuSampler, char_tokenizer, compare_curves, sample_steps, select_works, shakespeare_works, split_by_chars, steady_tokens_per_s,
)  # fmt: skip


def test_steady_tokens_per_s_leaves_out_the_first_windows_and_weights_by_time():
    history = [
        {"step": 10, "tokens_per_s": 100.0, "step_time_s": 1.0},  # start-up window: left out
        {"step": 20, "tokens_per_s": 1000.0, "step_time_s": 0.1},  # 10 steps in 1 s
        {"val_loss": 3.0, "step": 20},  # an evaluation entry carries no throughput
        {"step": 30, "tokens_per_s": 500.0, "step_time_s": 0.2},  # 10 steps in 2 s
        {"step": 35, "tokens_per_s": 1000.0, "step_time_s": 0.1},  # a short last window: 5 steps in 0.5 s
    ]
    # tokens 1000 + 1000 + 500 over 1 + 2 + 0.5 s
    assert steady_tokens_per_s(history, skip_steps=10) == pytest.approx(2500 / 3.5)
    assert steady_tokens_per_s(history, skip_steps=0) == pytest.approx(3500 / 13.5)  # + 1000 tokens in 10 s
    assert steady_tokens_per_s(history, skip_steps=35) is None


def test_compare_curves_uses_the_steps_both_logged():
    a = [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0}, {"step": 30, "loss": 3.0}]
    b = [{"step": 10, "loss": 5.5}, {"step": 20, "loss": 3.9}, {"step": 25, "loss": 1.0}]
    c = compare_curves(a, b)
    assert c["steps"] == [10, 20]
    assert c["max_abs_diff"] == pytest.approx(0.5) and c["mean_abs_diff"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="share no step"):
        compare_curves(a, [{"step": 1, "loss": 1.0}])


def test_sample_steps_keeps_the_ends():
    assert sample_steps([1, 2, 3], 8) == [1, 2, 3]
    picked = sample_steps(list(range(10, 310, 10)), 5)
    assert picked[0] == 10 and picked[-1] == 300 and len(picked) == 5


def test_shakespeare_selection_and_the_90_10_split_of_characters():
    works = shakespeare_works()
    assert {"hamlet", "sonnets", "tempest"} <= works and not works & {"paradise_lost", "paradise_regained"}
    docs = [("tempest/0001", "b" * 10), ("hamlet/0002", "a" * 50), ("hamlet/0001", "a" * 30),
            ("paradise_lost/0001", "m" * 40), ("hamlet/0001#copy", "a" * 30), ("tempest/0000", "c" * 10)]  # fmt: skip
    chosen = select_works(docs, works)
    assert [i for i, _ in chosen] == ["hamlet/0001", "hamlet/0002", "tempest/0000", "tempest/0001"]
    train, validation = split_by_chars(chosen, 0.9)  # 100 characters: the first 90 train
    assert [i for i, _ in train] == ["hamlet/0001", "hamlet/0002", "tempest/0000"]
    assert [i for i, _ in validation] == ["tempest/0001"]


def test_the_character_tokenizer_gives_one_id_per_character_and_decodes_exactly():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\tSpeak, speak!"
    tokenizer = char_tokenizer([text])
    ids = tokenizer.encode(text).ids
    assert len(ids) == len(text) and len(set(ids)) == len(set(text)) == tokenizer.get_vocab_size()
    assert tokenizer.decode(ids) == text


def test_cpu_sampler_counts_the_training_intervals_only():
    cpu = CpuSampler(threads=2, skip=1)
    hz = os.sysconf("SC_CLK_TCK")
    # (time, trainer ticks, other ticks): start-up (1 core), two skipped-then-counted training seconds, the end
    cpu.samples = [(0.0, 0, 0), (1.0, hz, 0), (2.0, 3 * hz, hz // 10), (3.0, 5 * hz, hz // 5), (4.0, 7 * hz, hz), (5.0, 7 * hz, hz)]
    # training intervals: 1-2, 2-3, 3-4 (2 cores each); the first is skipped
    assert cpu.result() == pytest.approx({"trainer_cores": 2.0, "other_cores": (hz - hz // 10) / hz / 2, "seconds": 2.0})
    cpu.samples = cpu.samples[:2]
    assert cpu.result() is None


def test_cpu_sampler_sees_a_busy_training_process():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass", "train_common.py"])
    with CpuSampler(threads=1, interval=0.2, skip=0) as cpu:
        busy.wait()
    result = cpu.result()
    assert result is not None and result["trainer_cores"] == pytest.approx(1.0, abs=0.25)
