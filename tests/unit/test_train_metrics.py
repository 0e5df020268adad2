"""Training figures without Ray: FLOPs per token, MFU, bits per byte, the timing window, the progress line, the plot."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from raylm.artifacts import stage_output
from raylm.model.gpt import GPT, GPTConfig
from raylm.tokenize.bpe import train_tokenizer
from raylm.tokenize.packing import packed_split
from raylm.tokenize.shards import TokenSplit, read_token_meta, write_token_data
from raylm.train.config import TrainConfig
from raylm.train.flops import (
    flops_per_token, known_gpu_peak, measure_matmul_flops, model_flops_utilization, peak_flops_per_worker,
)  # fmt: skip
from raylm.train.step import StepWindow
from raylm.train.topology import rank_coords
from raylm.train.validation import ValidationSet, validation_tokens_per_byte
from raylm.train.metrics import bits_per_byte, params_held, peak_rss_mb, plot_loss_curve, progress_line, target_bytes

EOS = "<|endoftext|>"


def test_flops_per_token_counts_every_matmul_weight_six_times_plus_attention():
    # d=8, 2 layers, vocab 100: per block qkv 8x24 + proj 8x8 + fc 8x32 + proj 32x8 = 768 weights; the tied
    # lm_head 8x100 = 800 once (the embedding lookups and the norms do no matmul).
    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=8)
    assert flops_per_token(cfg, seq_len=16) == 6 * (2 * 768 + 800) + 12 * 2 * 8 * 16 == 17088
    assert flops_per_token(cfg, seq_len=4) == 6 * 2336 + 12 * 2 * 8 * 4  # attention grows with the context
    # SwiGLU: hidden 8d/3 rounded up to 32 -> fc, gate and proj of 8x32 each
    swiglu = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=8, mlp="swiglu", positions="rotary")
    assert flops_per_token(swiglu.to_dict(), 16) == 6 * (2 * (192 + 64 + 3 * 256) + 800) + 12 * 2 * 8 * 16
    assert GPT(cfg).flops_per_token() == flops_per_token(cfg, 16)  # the model's default context is block_size


def test_mfu_is_model_flops_per_second_over_the_workers_combined_peak():
    # 1 MFLOP/token x 1000 tokens/s = 1 GFLOP/s over 2 workers of 1 GFLOP/s
    assert model_flops_utilization(1e6, 1000.0, 1e9, workers=2) == pytest.approx(0.5)
    assert peak_flops_per_worker(2.5e12, "fp32", torch.device("cpu")) == (2.5e12, "configured")


def test_gpu_peaks_by_device_name():
    assert known_gpu_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert known_gpu_peak("NVIDIA H100 PCIe") == 756e12
    assert known_gpu_peak("NVIDIA H200") == 989e12
    assert known_gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert known_gpu_peak("NVIDIA A10G") == 70e12 and known_gpu_peak("NVIDIA A10") == 125e12
    assert known_gpu_peak("Tesla T4") is None  # unknown: the worker measures instead


def test_the_measured_cpu_peak_is_a_flop_rate_above_what_a_small_model_reaches():
    torch.set_num_threads(1)
    peak, source = peak_flops_per_worker(None, "fp32", torch.device("cpu"))
    assert source == "measured" and peak > 1e8
    assert measure_matmul_flops(torch.float32, torch.device("cpu"), size=256, repeats=1) > 1e8


def test_bits_per_byte_of_a_hand_counted_text():
    # one bit per token (loss ln 2 nats), 4 bytes per token: a quarter of a bit per byte
    assert bits_per_byte(math.log(2), tokens_per_byte=0.25) == pytest.approx(0.25)
    texts = ["héllo wörld", "día de sol"]  # 13 and 11 UTF-8 bytes: 'é', 'ö', 'í' take two each
    tokenizer = train_tokenizer([texts * 20], vocab_size=280, min_frequency=2, special_tokens=(EOS,), show_progress=False)
    eos = tokenizer.token_to_id(EOS)
    stream = [eos, *tokenizer.encode(texts[0]).ids, eos, *tokenizer.encode(texts[1]).ids]
    if (len(stream) - 1) % 2:
        stream.append(eos)  # end-of-text counts no bytes
    seq_len = (len(stream) - 1) // 2
    rows = np.array([stream[: seq_len + 1], stream[seq_len:]])  # two rows overlapping by one token
    assert target_bytes(tokenizer, rows) == 13 + 11  # the first row's first token (end of text) is no target
    loss = 1.7  # nats per target token
    expected = loss * (2 * seq_len) / (24 * math.log(2))
    assert bits_per_byte(loss, 2 * seq_len / target_bytes(tokenizer, rows)) == pytest.approx(expected)


def test_validation_bytes_are_counted_over_exactly_the_rows_every_rank_evaluates(tmp_path):
    words = "the cat sat on a mat by the sea".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(60)]
    tokenizer = train_tokenizer([docs], vocab_size=300, min_frequency=2, special_tokens=(EOS,), show_progress=False)
    eos = tokenizer.token_to_id(EOS)
    with stage_output(tmp_path / "tokens", "tokenize", {"test": "bpb"}) as out:
        splits = {s: packed_split([tokenizer.encode(d).ids for d in part], eos, 8) for s, part in
                  (("train", docs[:40]), ("validation", docs[40:]))}  # fmt: skip
        out.stats = write_token_data(out.tmp, tokenizer, eos, splits, shard_rows=5).to_stats()
    meta = read_token_meta(tmp_path / "tokens")
    cfg = TrainConfig(data=str(meta.path), output=str(tmp_path / "out"), micro_batch_size=2, eval_batches=3)
    evaluated = [
        b.numpy() for r in range(2) for b in ValidationSet.read(cfg, meta, rank_coords(r, 2), torch.device("cpu")).batches
    ]
    targets = np.concatenate(evaluated)[:, 1:]  # (2 ranks x 3 batches x 2 rows, 8)
    assert targets.shape == (12, 8)
    # ASCII text: each target token's own bytes add up; end of text adds none
    text_bytes = sum(len(tokenizer.decode([int(i)], skip_special_tokens=True).encode()) for i in targets.reshape(-1))
    assert validation_tokens_per_byte(cfg, meta, str(meta.tokenizer_file), dp_size=2) == pytest.approx(targets.size / text_bytes)
    assert target_bytes(tokenizer, TokenSplit(meta, "validation").rows(np.arange(12))) == text_bytes


@pytest.fixture
def single_process_group(tmp_path):
    """A real one-rank gloo process group, as the window's all-reduces need one."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_window_means_split_and_mfu(single_process_group):
    window = StepWindow(torch.device("cpu"), grad_accum_steps=2, flops_per_token=1e6, peak_flops_per_worker=1e9)
    for loss in (1.0, 2.0, 3.0, 6.0):  # 4 micro-batches = 2 optimizer steps
        window.add(torch.tensor(loss), {})
    window.add_grad_norm(torch.tensor(0.5))
    window.add_grad_norm(float("inf"))  # an overflowed step: skipped
    window.add_grad_norm(1.5)
    window.add_grad_norm(None)  # not known: ignored
    window.data_wait, window.forward_backward, window.optimizer = 0.1, 0.5, 0.2
    window.started = time.perf_counter() - 1.0  # at least a second in this window
    values = window.flush(lr=1e-3, tokens_per_step=1000)

    assert values["loss"] == pytest.approx(3.0) and values["grad_norm"] == pytest.approx(1.0)
    seconds = 2 * values["step_time_s"]  # 2 optimizer steps
    assert 1.0 <= seconds < 10.0
    assert values["tokens_per_s"] == pytest.approx(1000 / values["step_time_s"])
    assert values["data_wait_s"] == pytest.approx(0.05)
    assert values["forward_backward_s"] == pytest.approx(0.25) and values["optimizer_s"] == pytest.approx(0.1)
    assert values["forward_backward_frac"] == pytest.approx(0.5 / seconds)
    assert values["data_wait_frac"] == pytest.approx(0.1 / seconds)
    assert values["data_wait_s"] + values["forward_backward_s"] + values["optimizer_s"] <= values["step_time_s"]
    assert values["mfu"] == pytest.approx(1e6 * values["tokens_per_s"] / 1e9)
    assert values["peak_rss_mb"] == pytest.approx(peak_rss_mb(), rel=0.05) and values["peak_rss_mb"] > 10
    assert "peak_gpu_mem_mb" not in values

    window.add(torch.tensor(1.0), {})  # the next window starts empty: no grad norm, fresh timers
    after = window.flush(lr=1e-3, tokens_per_step=1000)
    assert "grad_norm" not in after and after["forward_backward_s"] == 0.0


def test_params_held_counts_whole_parameters_without_zero3():
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=8))
    assert params_held(model) == model.num_params(non_embedding=False)


def test_progress_line_and_plot_show_the_new_figures(tmp_path):
    values = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 12345.0, "mfu": 0.123, "step_time_s": 0.2,
              "data_wait_frac": 0.01, "forward_backward_frac": 0.8, "optimizer_frac": 0.15, "peak_rss_mb": 812.0}  # fmt: skip
    line = progress_line(10, 100, values)
    assert "gnorm 0.750" in line and "mfu 12.3%" in line and "(data 1% fwd+bwd 80% opt 15%)" in line
    assert "rss 812 MiB" in line
    assert "val_bpb 1.234" in progress_line(10, 100, {"val_loss": 2.0, "val_ppl": 7.39, "val_bpb": 1.234})
    history = [{"step": s, **values, "loss": 3.0 - 0.1 * s} for s in (2, 4, 6)] + [{"step": 6, "val_loss": 2.6}]
    png = plot_loss_curve(history, tmp_path / "curve.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
