"""The train stage on CUDA GPUs: a bf16 + NCCL run of the `125m` preset, with its MFU printed (skipped without a GPU)."""

from __future__ import annotations

import math

import torch

from raylm.config import load_config
from raylm.stages import run_stage


def test_125m_trains_in_bf16_over_nccl_and_reports_mfu(ray_local, make_tokens, tmp_path):
    tokens = make_tokens(tmp_path / "tokens", seq_len=128)
    gpus = torch.cuda.device_count()
    cfg = load_config(
        None,
        [
            "--prepare.input=unused",
            f"--run.workdir={tmp_path}",
            "--run.name=gpu125m",
            f"--tokenize.output={tokens.path}",
            "--train.model.preset=125m",
            f"--train.num_workers={gpus}",
            "--train.use_gpu=true",
            "--train.precision=bf16",
            "--train.zero_stage=1",
            "--train.micro_batch_size=8",
            "--train.max_steps=40",
            "--train.optimizer.lr=3e-4",
            "--train.log_interval_steps=10",
            "--train.eval_interval_steps=20",
            "--train.checkpoint_interval_steps=40",
            "--train.eval_batches=2",
        ],
    )
    summary = run_stage("train", cfg)
    print(
        f"\n125m bf16 NCCL on {gpus} x {torch.cuda.get_device_name(0)}: {summary['tokens_per_s']:,.0f} tokens/s, "
        f"MFU {summary.get('mfu', float('nan')):.3f} of {summary.get('peak_flops_per_worker', float('nan')):.3g} FLOP/s per GPU"
    )
    assert math.isfinite(summary["loss"]) and summary["loss"] < math.log(tokens.vocab_size)
    assert 0 < summary["mfu"] < 1
    print(f"export vs bf16 engine, max |logit difference|: {summary['export_max_abs_diff']:.3g}")
