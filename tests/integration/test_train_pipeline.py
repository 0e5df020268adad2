"""DeepSpeed pipeline parallelism in the train stage: 2 stages x 1 data-parallel rank on a debug GPT, a few steps.

The shared local Ray runs the stage, its export and a resume; a separate 2-node Ray
(`ray.cluster_utils.Cluster`, in a child process: it must not share the session's Ray) shows
pipeline_placement=spread putting the two stages on different nodes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.model.artifact import load_model
from raylm.runtime import local_system_config
from raylm.train.ingest import SequenceOrder, sample_checksum
from raylm.tokenize.shards import TokenMeta
from raylm.train.pipeline_parallel import state_dict_from_checkpoint
from raylm.train.trainer import build_trainer
from raylm.stages import run_stage

SEQ_LEN = 32
MICRO, ACCUM = 4, 2  # two micro-batches per step, so the pipeline has something to overlap


def overrides(root: Path, tokens: Path, *extra: str) -> list[str]:
    return [
        "--prepare.input=unused",
        f"--run.workdir={root}",
        "--run.name=pipe",
        f"--tokenize.output={tokens}",
        "--train.model.preset=debug",
        "--train.num_workers=2",
        "--train.pipeline_stages=2",
        "--train.zero_stage=1",
        f"--train.micro_batch_size={MICRO}",
        f"--train.grad_accum_steps={ACCUM}",
        "--train.max_steps=6",
        "--train.optimizer.warmup_steps=1",
        "--train.log_interval_steps=2",
        "--train.eval_interval_steps=3",
        "--train.checkpoint_interval_steps=3",
        "--train.eval_batches=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def tokens(make_tokens, tmp_path_factory) -> TokenMeta:
    return make_tokens(tmp_path_factory.mktemp("pipeline-tokens") / "tokens", seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory, tokens):
    """One 2-stage pipeline run of the train stage, shared by the tests below: (config, summary)."""
    root = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(None, overrides(root, tokens.path))
    return cfg, run_stage("train", cfg)


def test_pipeline_run_learns_and_reports_what_a_plain_run_reports(trained):
    cfg, summary = trained
    out = Path(cfg.train.output)
    assert summary["steps"] == 6
    for key in ("loss", "val_loss", "val_ppl", "tokens_per_s"):
        assert math.isfinite(summary[key]), key
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-6)
    history = json.loads((out / "metrics.json").read_text())["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    val_losses = [h["val_loss"] for h in history if "val_loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]  # steps 2, 3 (an evaluation), 4, 6
    assert len(val_losses) == 2 and val_losses[-1] < val_losses[0]
    # both stages on the one local node, and the map says so
    stage_nodes = summary["pipeline_stage_nodes"]
    assert len(stage_nodes) == 2 and stage_nodes[0] == stage_nodes[1] and len(stage_nodes[0]) == 1


def test_export_matches_the_pipeline_engine_and_its_layer_files(trained, tokens):
    cfg, summary = trained
    model = load_model(Path(summary["model"]))
    assert model.meta["trained_steps"] == 6 and model.meta["pipeline_stages"] == 2
    assert model.config.vocab_size == tokens.vocab_size
    # the engine's own logits (computed by the two stages) against the exported single-device GPT's
    checkpoint = Path(summary["checkpoint"])
    probe = load_file(str(checkpoint / "export_probe.safetensors"))
    with torch.no_grad():
        logits, _ = model.model(probe["input_ids"])
    assert summary["export_max_abs_diff"] < 1e-5
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)
    # the DeepSpeed checkpoint's per-layer files on disk hold the same (fp32) weights
    state = state_dict_from_checkpoint(checkpoint / "deepspeed", model.config)
    for name, value in model.model.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    files = sorted(p.name for p in (checkpoint / "deepspeed" / "step6").glob("layer_*-model_states.pt"))
    assert files == [f"layer_{i:02d}-model_states.pt" for i in range(model.config.n_layer + 3)]


def test_pipeline_run_resumes_from_its_checkpoint_at_the_data_position(trained, tokens):
    cfg, _ = trained
    more = cfg.train.model_copy(update={"max_steps": 8, "eval_interval_steps": 2, "checkpoint_interval_steps": 2})
    result = build_trainer(more, run_name=cfg.run.name, storage_path=str(Path(cfg.train.output) / "ray")).fit()
    assert result.metrics["start_step"] == 6 and result.metrics["step"] == 8
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["val_loss"])
    # One pipeline (dp rank 0) read the first 8 x ACCUM micro-batches of the seeded order, once each:
    # both stages read them, but the samples count once.
    order = SequenceOrder(tokens.num_sequences["train"], micro_batch_size=MICRO, dp_size=1, seed=cfg.run.seed)
    expected = 0
    for k in range(8 * ACCUM):
        epoch, b = divmod(k, order.batches_per_epoch)
        expected += sample_checksum(order.epoch_indices(epoch, 0)[b], epoch)
    assert result.metrics["sample_checksum"] == expected % (2**61 - 1)
    with result.checkpoint.as_directory() as d:
        assert load_model(Path(d) / "model").meta["trained_steps"] == 8


def test_spread_placement_on_a_single_node_is_refused_before_workers_start(trained, tokens):
    cfg, _ = trained
    spread = cfg.train.model_copy(update={"pipeline_placement": "spread"})
    with pytest.raises(ConfigError, match=r"train.pipeline_placement=spread: 2 stages need 2 nodes .* the cluster has 1"):
        build_trainer(spread, run_name="spread", storage_path=str(tokens.path.parent / "spread"))


@pytest.mark.slow  # a second Ray (two raylets) and a Train worker group on it: ~1-3 minutes on 2 cores
def test_spread_puts_the_two_stages_on_two_nodes(tokens, tmp_path):
    """A 2-node Ray in a child process (this file run as a script): stage 0 and stage 1 on different nodes."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, __file__, str(tokens.path), str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # the workers' forwarded log lines may come after the report: it is the line that carries the mark
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith(REPORT_MARK))[len(REPORT_MARK):])
    stage0, stage1 = report["pipeline_stage_nodes"]
    assert len(stage0) == len(stage1) == 1 and stage0 != stage1
    assert set(stage0 + stage1) == set(report["cluster_nodes"])
    assert report["step"] == 4 and report["loss"] < report["first_loss"]


REPORT_MARK = "two-node report: "


def _two_node_child(tokens: str, root: str) -> None:
    """Child process: a head and a second node of 2 CPUs each; a spread 2-stage pipeline with activation checkpointing."""
    import logging

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "_system_config": local_system_config()})
    try:
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        cluster.wait_for_nodes()
        cfg = load_config(None, overrides(Path(root), Path(tokens), "--train.max_steps=4", "--train.pipeline_placement=spread",
                                          "--train.activation_checkpointing=true", "--train.eval_interval_steps=4",
                                          "--train.checkpoint_interval_steps=4", "--train.tensorboard=false"))  # fmt: skip
        result = build_trainer(cfg.train, run_name="spread", storage_path=str(Path(root) / "ray")).fit()
        with result.checkpoint.as_directory() as d:
            history = json.loads((Path(d) / "state.json").read_text())["history"]
        first_loss = next(h["loss"] for h in history if "loss" in h)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        print(REPORT_MARK + json.dumps({**{k: result.metrics[k] for k in ("pipeline_stage_nodes", "step", "loss")},
                                        "first_loss": first_loss, "cluster_nodes": nodes}), flush=True)  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _two_node_child(sys.argv[1], sys.argv[2])
