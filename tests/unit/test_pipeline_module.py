"""The GPT as DeepSpeed pipeline layers, on one process: same logits, loss and gradients as GPT; config errors."""

from __future__ import annotations

import pytest
import torch

from raylm.errors import ConfigError, InputError
from raylm.model.gpt import GPT, GPTConfig
from raylm.train.config import TrainConfig
from raylm.train.deepspeed_config import deepspeed_config
from raylm.train.pipeline_parallel import (
    EXTRA_LAYERS,
    check_pipeline,
    layer_specs,
    load_gpt_weights,
    local_layers,
    pipeline_loss,
    run_layers,
    state_dict_from_checkpoint,
)

VARIANTS = [
    dict(),
    dict(positions="rotary", mlp="swiglu"),
    dict(bias=True, dropout=0.0, attention="bidirectional"),
]


def small(**kw) -> GPTConfig:
    return GPTConfig(vocab_size=97, block_size=16, n_layer=3, n_head=2, d_model=32, **kw)


def gpt_and_layers(cfg: GPTConfig, seed: int = 0):
    torch.manual_seed(seed)
    gpt = GPT(cfg)
    modules, funcs = local_layers(cfg)
    load_gpt_weights(modules, gpt)
    return gpt, modules, funcs


@pytest.mark.parametrize("kw", VARIANTS)
def test_layers_in_sequence_compute_what_gpt_computes(kw):
    cfg = small(**kw)
    gpt, modules, funcs = gpt_and_layers(cfg)
    idx = torch.randint(cfg.vocab_size, (3, cfg.block_size))
    targets = torch.randint(cfg.vocab_size, (3, cfg.block_size))
    targets[0, :5] = -100  # ignored positions are ignored by both
    logits, loss = gpt(idx, targets)
    pipe_logits = run_layers(funcs, idx)
    pipe_loss = pipeline_loss(pipe_logits, targets)
    torch.testing.assert_close(pipe_logits, logits, rtol=0, atol=0)
    torch.testing.assert_close(pipe_loss, loss, rtol=0, atol=0)

    # The same gradients, the tied embedding's included (input and output use summed into one).
    loss.backward()
    pipe_loss.backward()
    grads = dict(gpt.named_parameters())
    for name, param in modules.named_parameters():
        gpt_name = {"tied_modules.embed.weight": "wte.weight"}.get(name)
        if gpt_name is None:
            layer, key = name.split(".", 1)
            layer = int(layer)
            gpt_name = key if layer == 1 else f"blocks.{layer - 2}.{key}" if layer < 2 + cfg.n_layer else f"ln_f.{key}"
        torch.testing.assert_close(param.grad, grads[gpt_name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_every_gpt_parameter_is_in_exactly_one_layer():
    cfg = small()
    gpt, modules, funcs = gpt_and_layers(cfg)
    assert len(funcs) == cfg.n_layer + EXTRA_LAYERS == len(layer_specs(cfg))
    assert sum(p.numel() for p in modules.parameters()) == gpt.num_params(non_embedding=False)


def test_same_seed_same_initial_weights_as_gpt_and_a_different_seed_differs():
    cfg = small()
    gpt, modules, _ = gpt_and_layers(cfg, seed=3)
    other, _, _ = gpt_and_layers(cfg, seed=4)
    assert torch.equal(modules["tied_modules"]["embed"].weight, gpt.wte.weight)
    assert torch.equal(modules["2"].attn.qkv.weight, gpt.blocks[0].attn.qkv.weight)
    assert not torch.equal(other.wte.weight, gpt.wte.weight)


def test_state_dict_from_layer_files_loads_into_gpt(tmp_path):
    """Layer files named and laid out as PipelineModule.save_state_dict writes them, read back weights-only."""
    cfg = small()
    gpt, modules, _ = gpt_and_layers(cfg, seed=1)
    tag = tmp_path / "step4"
    tag.mkdir()
    (tmp_path / "latest").write_text("step4")
    torch.save(modules["tied_modules"]["embed"].state_dict(), tag / "layer_00-model_states.pt")
    for index in range(1, cfg.n_layer + 3):
        torch.save(modules[str(index)].state_dict(), tag / f"layer_{index:02d}-model_states.pt")
    torch.save({"unrelated": torch.zeros(1)}, tag / "mp_rank_00_model_states.pt")

    state = state_dict_from_checkpoint(tmp_path, cfg)
    loaded = GPT(cfg)
    loaded.load_state_dict(state)  # strict: every key present, none extra
    idx = torch.randint(cfg.vocab_size, (2, 8))
    torch.testing.assert_close(loaded(idx)[0], gpt(idx)[0], rtol=0, atol=0)

    (tag / "layer_03-model_states.pt").unlink()
    with pytest.raises(InputError, match=r"parameters missing from the layer files: \['blocks.1"):
        state_dict_from_checkpoint(tmp_path, cfg)
    with pytest.raises(InputError, match="no such DeepSpeed checkpoint tag"):
        state_dict_from_checkpoint(tmp_path, cfg, tag="step9")


class _RunsCode:
    """Unpickling this calls a function: what weights_only loading must refuse."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_layer_files_are_read_without_unpickling_code(tmp_path):
    cfg = small()
    tag = tmp_path / "t"
    tag.mkdir()
    torch.save({"weight": torch.zeros(1), "code": _RunsCode()}, tag / "layer_00-model_states.pt")
    with pytest.raises(InputError, match="layer_00-model_states.pt: unreadable layer file"):
        state_dict_from_checkpoint(tmp_path, cfg, tag="t")


def train_config(**kw) -> TrainConfig:
    return TrainConfig(data="tokens", output="out", **kw)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(num_workers=3, pipeline_stages=2), r"train.num_workers=3 is not a multiple of train.pipeline_stages=2"),
        (dict(num_workers=2, pipeline_stages=2, zero_stage=2), r"train.zero_stage=2: DeepSpeed pipeline parallelism"),
        (dict(num_workers=2, pipeline_stages=2, zero_stage=3), r"train.zero_stage=3: .* ZeRO stage 0 or 1 only"),
        (
            dict(num_workers=2, pipeline_stages=2, use_gpu=True, offload_optimizer=True),
            r"train.offload_optimizer: ZeRO-Offload does not combine with train.pipeline_stages=2",
        ),
        (dict(num_workers=6, pipeline_stages=6), r"train.pipeline_stages=6 exceeds the model's 3 blocks \+ embedding"),
    ],
)
def test_pipeline_misconfigurations_name_the_key(kw, message):
    with pytest.raises(ConfigError, match=message) as e:
        check_pipeline(train_config(**kw), small())
    assert "\n" not in str(e.value)


def test_valid_pipeline_configs_pass():
    check_pipeline(train_config(num_workers=4, pipeline_stages=2, zero_stage=1), small())
    check_pipeline(train_config(num_workers=5, pipeline_stages=5, zero_stage=0), small())  # 3 blocks + 2
    check_pipeline(train_config(num_workers=3, zero_stage=3), small())  # no pipeline: anything goes


def test_deepspeed_batch_uses_the_data_parallel_size_not_the_worker_count():
    cfg = train_config(num_workers=4, pipeline_stages=2, micro_batch_size=4, grad_accum_steps=3)
    assert cfg.data_parallel_size == 2
    assert deepspeed_config(cfg, data_parallel_size=cfg.data_parallel_size)["train_batch_size"] == 24
