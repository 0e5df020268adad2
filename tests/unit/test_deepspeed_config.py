"""The DeepSpeed config derived from TrainConfig, its batch arithmetic, and the LR schedule (no Ray, no DeepSpeed)."""

import pytest
from pydantic import ValidationError

from raylm.errors import ConfigError
from raylm.train.config import OptimizerConfig, TrainConfig
from raylm.train.deepspeed_config import check_batch_arithmetic, deepspeed_config
from raylm.train.optim import lr_factor


def train_config(**kw) -> TrainConfig:
    return TrainConfig(data="tokens", output="out", **kw)


def test_defaults_give_zero1_fp32_with_clipping():
    ds = deepspeed_config(train_config(micro_batch_size=8, grad_accum_steps=2), data_parallel_size=2)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 1
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_train_batch_size_that_matches_is_accepted():
    cfg = train_config(micro_batch_size=4, grad_accum_steps=3, train_batch_size=24)
    assert check_batch_arithmetic(cfg, data_parallel_size=2) == 24


def test_train_batch_size_mismatch_names_every_factor():
    cfg = train_config(micro_batch_size=8, grad_accum_steps=1, train_batch_size=64)
    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg, data_parallel_size=2)
    msg = str(e.value)
    assert msg == (
        "train.train_batch_size=64 != micro_batch_size 8 x grad_accum_steps 1 x data-parallel size 2 = 16"
    )


def test_pipeline_batch_counts_data_parallel_ranks_not_workers():
    cfg = train_config(num_workers=4, pipeline_stages=2, micro_batch_size=2, grad_accum_steps=4, train_batch_size=16)
    ds = deepspeed_config(cfg, data_parallel_size=cfg.data_parallel_size)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    wrong = cfg.model_copy(update={"train_batch_size": 32})  # as if all 4 workers were data-parallel
    with pytest.raises(ConfigError) as e:
        deepspeed_config(wrong, data_parallel_size=wrong.data_parallel_size)
    assert str(e.value) == (
        "train.train_batch_size=32 != micro_batch_size 2 x grad_accum_steps 4 x data-parallel size 2"
        " (num_workers 4 / pipeline_stages 2) = 16"
    )


def test_data_parallel_size_must_be_positive():
    with pytest.raises(ConfigError, match="data-parallel size"):
        deepspeed_config(train_config(), data_parallel_size=0)


def test_bf16_and_zero3():
    ds = deepspeed_config(train_config(precision="bf16", zero_stage=3), data_parallel_size=4)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_fp16_needs_gpu_and_gets_dynamic_loss_scaling():
    with pytest.raises(ValidationError, match="fp16 needs use_gpu"):
        train_config(precision="fp16")
    ds = deepspeed_config(train_config(precision="fp16", use_gpu=True), data_parallel_size=8)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0


def test_offload_settings():
    ds = deepspeed_config(
        train_config(use_gpu=True, zero_stage=3, offload_optimizer=True, offload_params=True), data_parallel_size=2
    )
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["overlap_comm"] is True


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(offload_optimizer=True), "need use_gpu"),
        (dict(use_gpu=True, offload_params=True, zero_stage=2), "offload_params needs zero_stage 3"),
        (dict(use_gpu=True, offload_optimizer=True, zero_stage=0), "offload_optimizer needs zero_stage"),
    ],
)
def test_offload_misconfigurations_are_rejected(kw, message):
    with pytest.raises(ValidationError, match=message):
        train_config(**kw)


def test_grad_clip_zero_turns_clipping_off():
    ds = deepspeed_config(train_config(optimizer=OptimizerConfig(grad_clip=0.0)), data_parallel_size=1)
    assert ds["gradient_clipping"] == 0.0


def test_lr_warms_up_then_decays_to_min_ratio():
    opt = OptimizerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, opt, max_steps=100) for s in range(101)]
    assert factors[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11]))  # rising through warmup
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # cosine never rises again
    assert factors[100] == pytest.approx(0.1)


def test_linear_decay_falls_by_equal_steps_to_min_ratio():
    opt = OptimizerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, decay="linear")
    factors = [lr_factor(s, opt, max_steps=100) for s in range(101)]
    assert factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.1)
    assert factors[55] == pytest.approx(0.55)  # halfway down from 1.0 to 0.1
    steps = [a - b for a, b in zip(factors[10:], factors[11:])]
    assert max(steps) == pytest.approx(min(steps)) == pytest.approx(0.9 / 90)


def test_zero_1_and_2_run_as_zero_0_on_one_data_parallel_rank():
    from raylm.train.deepspeed_config import effective_zero_stage

    for stage in (1, 2):
        cfg = train_config(zero_stage=stage)
        assert deepspeed_config(cfg, data_parallel_size=1)["zero_optimization"] == {"stage": 0}
        assert deepspeed_config(cfg, data_parallel_size=2)["zero_optimization"]["stage"] == stage
    assert effective_zero_stage(train_config(zero_stage=3), 1) == 3  # ZeRO 3 is asked for its own reasons
    offload = train_config(zero_stage=1, offload_optimizer=True, use_gpu=True)
    assert effective_zero_stage(offload, 1) == 1  # offload is a ZeRO optimizer feature
    assert effective_zero_stage(train_config(zero_stage=1, num_workers=2, pipeline_stages=2), 1) == 1
