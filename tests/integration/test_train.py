"""The train stage on a local Ray: 2 DeepSpeed workers (gloo, CPU), a debug-size GPT, a few steps."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from raylm.artifacts import read_manifest
from raylm.config import load_config
from raylm.errors import InputError
from raylm.model.artifact import load_model
from raylm.train.ingest import SequenceOrder, sample_checksum
from raylm.train.worker_runtime import extensions_dir
from raylm.train.trainer import build_trainer
from raylm.stages import run_stage

SEQ_LEN = 32


RUN = [
    "--prepare.input=unused",
    "--run.name=unit",
    "--train.model.preset=debug",
    "--train.num_workers=2",
    "--train.zero_stage=3",
    "--train.activation_checkpointing=true",  # recomputation under ZeRO-3's gathered parameters
    "--train.micro_batch_size=4",
    "--train.max_steps=12",
    "--train.optimizer.warmup_steps=2",
    "--train.log_interval_steps=2",
    "--train.eval_interval_steps=6",
    "--train.checkpoint_interval_steps=6",
    "--train.eval_batches=2",
]
"""The run of `trained`, but for where its data and output are."""


@pytest.fixture(scope="module")
def trained(ray_local, make_tokens, tmp_path_factory):
    """One ZeRO-3 run of the train stage, shared by the tests below: (config, summary, token meta)."""
    root = tmp_path_factory.mktemp("train")
    tokens = make_tokens(root / "tokens", seq_len=SEQ_LEN)
    cfg = load_config(None, [*RUN, f"--run.workdir={root}", f"--tokenize.output={tokens.path}"])
    return cfg, run_stage("train", cfg), tokens


def test_train_stage_learns_and_exports_the_trained_weights(trained):
    cfg, summary, tokens = trained
    out = Path(cfg.train.output)
    assert summary["output"] == str(out) and summary["steps"] == 12
    assert math.isfinite(summary["loss"]) and math.isfinite(summary["val_loss"])
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-6)
    assert summary["tokens_per_s"] > 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    val_losses = [h["val_loss"] for h in history if "val_loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert len(val_losses) == 2 and val_losses[-1] < val_losses[0]
    assert (out / "loss_curve.png").stat().st_size > 0
    assert read_manifest(out)["stats"]["steps"] == 12
    assert not Path(f"{out}.ray").exists()  # the resumable run moved into the output

    # The exported model (ZeRO-3: gathered from both ranks' shards) reproduces the trained
    # engine's logits on a validation row.
    model = load_model(out / "model")
    assert model.config.vocab_size == tokens.vocab_size and model.config.block_size == SEQ_LEN
    assert model.eos_token_id == tokens.eos_token_id and model.meta["trained_steps"] == 12
    checkpoint = Path(summary["checkpoint"])
    assert (checkpoint / "deepspeed" / "latest").exists()
    probe = load_file(str(checkpoint / "export_probe.safetensors"))
    with torch.no_grad():
        logits, _ = model.model(probe["input_ids"])
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)
    assert summary["export_max_abs_diff"] < 1e-5

    assert run_stage("train", cfg)["steps"] == 12  # same config: the finished output is returned, nothing runs


def test_deepspeeds_cpu_comm_op_is_built_in_this_environments_own_folder(trained):
    """DeepSpeed JIT-builds its shared-memory all-reduce in the workers: into the folder of this virtual environment
    and ninja, so another checkout's environment or another ninja on the machine neither rebuilds it nor has it rebuilt."""
    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR", extensions_dir())) / "deepspeed_shm_comm"
    assert (built / "deepspeed_shm_comm.so").is_file()


def test_the_run_reports_its_training_figures_everywhere(trained):
    """Gradient norm, MFU, step-time split, bits per byte and memory: in the final metrics, the history,
    the summary and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raylm.tokenize.bpe import load_tokenizer
    from raylm.tokenize.shards import TokenSplit

    cfg, summary, tokens = trained
    out = Path(cfg.train.output)
    metrics = json.loads((out / "metrics.json").read_text())
    final, history = metrics["final"], metrics["history"]
    assert final["grad_norm"] > 0 and 0 < final["mfu"] < 1
    assert final["peak_flops_source"] == "measured" and final["peak_flops_per_worker"] > 1e8
    assert final["data_wait_s"] + final["forward_backward_s"] + final["optimizer_s"] <= final["step_time_s"]
    assert final["forward_backward_s"] > 0 and final["optimizer_s"] > 0
    # ZeRO-3 over 2 ranks: each holds half of the parameters (partitions padded to equal size)
    assert summary["num_params"] / 2 <= final["params_per_worker"] < summary["num_params"]
    assert final["peak_rss_mb"] > 100
    for key in ("grad_norm", "mfu", "val_bpb", "peak_rss_mb", "params_per_worker", "forward_backward_s"):
        assert summary[key] == final[key]

    # bits per byte over the rows evaluated: the first 2 batches x 4 rows x 2 ranks of the split; ASCII text,
    # so each target token's own bytes add up (end of text adds none)
    rows = TokenSplit(tokens, "validation").rows(np.arange(2 * 4 * 2))
    tokenizer = load_tokenizer(tokens.tokenizer_file)
    text_bytes = sum(len(tokenizer.decode([int(i)], skip_special_tokens=True).encode()) for i in rows[:, 1:].reshape(-1))
    assert final["val_bpb"] == pytest.approx(final["val_loss"] * rows[:, 1:].size / text_bytes / math.log(2), rel=1e-9)
    logged = [h for h in history if "loss" in h]
    assert all(h["grad_norm"] > 0 and 0 < h["mfu"] < 1 for h in logged)
    assert [h["step"] for h in history if "val_bpb" in h] == [6, 12]

    events = EventAccumulator(str(out / "ray" / cfg.run.name / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("loss", "grad_norm", "mfu", "tokens_per_s", "forward_backward_s", "optimizer_s", "data_wait_s",
                "peak_rss_mb", "val_loss", "val_bpb"):  # fmt: skip
        assert f"train/{key}" in tags, key
    assert [e.step for e in events.Scalars("train/grad_norm")] == [h["step"] for h in logged]


def test_raylm_export_consolidates_the_zero3_checkpoint_without_ray(trained, tmp_path):
    """ZeRO 3 shards every parameter across the 2 ranks' files: `export_checkpoint` (`raylm export`) gathers them
    in one process into the weights the live engine exported. (Before the resume test: it adds checkpoints.)"""
    from raylm.train.export import export_checkpoint

    _, summary, _ = trained
    checkpoint = Path(summary["checkpoint"])
    exported = load_file(str(export_checkpoint(checkpoint, tmp_path / "model") / "model.safetensors"))
    engine_export = load_file(str(checkpoint / "model" / "model.safetensors"))
    assert set(exported) == set(engine_export)
    for name, value in engine_export.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)


def test_a_run_resumes_from_its_latest_checkpoint(trained):
    """Fitting again with the same storage and name continues from step 12 instead of starting over."""
    cfg, _, tokens = trained
    more = cfg.train.model_copy(update={"max_steps": 16, "eval_interval_steps": 4, "checkpoint_interval_steps": 4})
    storage = Path(cfg.train.output) / "ray"
    result = build_trainer(more, run_name=cfg.run.name, storage_path=str(storage), seed=cfg.run.seed).fit()

    assert result.metrics["start_step"] == 12 and result.metrics["step"] == 16
    for key in ("loss", "val_loss", "val_ppl", "lr", "tokens_per_s", "data_wait_frac"):
        assert math.isfinite(result.metrics[key])
    # The resumed run went on from the checkpoint's data position: over both runs, every rank trained on
    # exactly its first 16 micro-batches of the seeded order, none repeated, none skipped.
    order = SequenceOrder(tokens.num_sequences["train"], micro_batch_size=4, dp_size=2, seed=cfg.run.seed)
    expected = 0
    for k in range(16):
        epoch, b = divmod(k, order.batches_per_epoch)
        for rank in range(2):
            expected += sample_checksum(order.epoch_indices(epoch, rank)[b], epoch)
    assert result.metrics["sample_checksum"] == expected % (2**61 - 1)
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        assert load_model(Path(d) / "model").meta["trained_steps"] == 16
    # one metrics history across both runs
    assert [h["step"] for h in state["history"] if "loss" in h] == [2, 4, 6, 8, 10, 12, 14, 16]


def test_data_longer_than_the_models_context_is_refused_before_any_worker_starts(trained):
    cfg, _, tokens = trained
    narrow = cfg.train.model_copy(update={"model": cfg.train.model.model_copy(update={"block_size": 16})})
    with pytest.raises(InputError, match=r"sequences of 32 tokens \(tokenize.seq_len\) exceed the model's context of 16"):
        build_trainer(narrow, run_name="narrow", storage_path=str(tokens.path.parent / "narrow"))


def test_training_on_s3_gives_the_same_run(trained, s3_bucket, tmp_path):
    """The same run with run.workdir on the S3 server: the token data read through the node's cache, the
    checkpoints in Ray Train's storage there, the model and figures written there; the same losses."""
    from raylm import storage

    cfg, summary, tokens = trained
    workdir = f"{s3_bucket}/run"
    storage.copy_tree(str(tokens.path), f"{workdir}/tokens")
    again = load_config(None, [*RUN, f"--run.workdir={workdir}"])
    result = run_stage("train", again)
    assert result["steps"] == summary["steps"]
    assert result["loss"] == summary["loss"] and result["val_loss"] == summary["val_loss"]
    output = f"{workdir}/train"
    assert result["output"] == output and read_manifest(output)["stats"]["loss"] == summary["loss"]
    names = {f.name for f in storage.list_files(output)}
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json", "metrics.json", "loss_curve.png"} <= names
    assert result["checkpoint"].startswith(f"{output}/ray/unit/checkpoint_")
    assert storage.list_files(result["checkpoint"])  # the final checkpoint moved into the output
    assert not storage.list_files(f"{output}.ray")  # and the resumable copy beside it is gone
    local = load_model(Path(summary["model"]))
    copied = tmp_path / "model"
    storage.copy_tree(result["model"], str(copied))
    theirs = load_model(copied)
    assert all(torch.equal(a, b) for a, b in zip(local.model.state_dict().values(), theirs.model.state_dict().values()))
    # TensorBoard events reach the bucket too (written locally by rank 0, uploaded), with the disk run's values
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events_dir = tmp_path / "tensorboard"
    storage.copy_tree(f"{output}/ray/unit/tensorboard", str(events_dir))
    events = EventAccumulator(str(events_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/val_loss")][-1] == summary["steps"]
    assert events.Scalars("train/val_loss")[-1].value == pytest.approx(summary["val_loss"], rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tensorboard"]  # nothing else here
