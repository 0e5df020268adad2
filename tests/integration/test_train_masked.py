"""A masked-language-model run of the train stage: 2 DeepSpeed workers, bidirectional attention, BERT masking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file
import torch

from raylm.config import load_config
from raylm.errors import InputError
from raylm.model.artifact import load_model
from raylm.stages import run_stage


def test_masked_lm_run_learns_and_exports_a_bidirectional_model(ray_local, make_tokens, tmp_path):
    tokens = make_tokens(tmp_path / "tokens", special_tokens=("<|endoftext|>", "<|mask|>"))
    overrides = [
        "--prepare.input=unused",
        f"--run.workdir={tmp_path}",
        "--run.name=mlm",
        f"--tokenize.output={tokens.path}",
        "--train.objective=masked",
        "--train.mask_fraction=0.3",
        "--train.model.preset=debug",
        "--train.num_workers=2",
        "--train.zero_stage=2",
        "--train.micro_batch_size=8",
        "--train.max_steps=16",
        "--train.optimizer.lr=3e-3",
        "--train.optimizer.warmup_steps=2",
        "--train.log_interval_steps=4",
        "--train.eval_interval_steps=8",
        "--train.checkpoint_interval_steps=8",
        "--train.eval_batches=2",
    ]
    cfg = load_config(None, overrides)
    summary = run_stage("train", cfg)
    out = Path(cfg.train.output)
    history = json.loads((out / "metrics.json").read_text())["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    assert losses[-1] < losses[0] and vals[-1] < vals[0]
    assert vals[-1] < math.log(tokens.vocab_size)  # better than a uniform guess over the vocabulary

    model = load_model(out / "model")
    assert model.config.attention == "bidirectional"
    probe = load_file(str(Path(summary["checkpoint"]) / "export_probe.safetensors"))
    with torch.no_grad():
        logits, _ = model.model(probe["input_ids"])
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)

    from raylm.serve.engine import Engine

    with pytest.raises(InputError, match="masked-language model .* cannot generate"):
        Engine(out / "model")
