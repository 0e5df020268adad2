"""A worker's DeepSpeed engine for a plain (non-pipeline) run: the GPT, its AdamW and schedule, deepspeed.initialize.

Pipeline runs build theirs in raylm.train.pipeline_parallel.
"""

from __future__ import annotations

import torch

from raylm.errors import ConfigError
from raylm.model.gpt import GPT, GPTConfig
from raylm.model.lora import apply_lora
from raylm.train.config import TrainConfig
from raylm.train.finetune import load_init_weights
from raylm.train.optim import build_optimizer, lr_schedule


def build_engine(cfg: TrainConfig, model_config: GPTConfig, deepspeed_config: dict, seed: int):
    """(DeepSpeed engine, its LR scheduler, parameter count) of the GPT, AdamW and the DeepSpeed config.

    Every rank seeds the same generator first, so every rank starts from the same initial weights.
    """
    import deepspeed  # picks its accelerator on import: after the worker's DS_ACCELERATOR is set

    torch.manual_seed(seed)
    model = GPT(model_config)
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.init_from:  # continued pretraining or fine-tuning: the base model's weights (raylm.train.finetune)
        load_init_weights(model, cfg.init_from)
    if cfg.lora is not None:  # freezes the base: build_optimizer then takes only the adapters
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout)
    num_params = model.num_params(non_embedding=False)  # before ZeRO-3 partitions the parameters away
    optimizer = build_optimizer(model, cfg)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_schedule(optimizer, cfg), config=deepspeed_config
    )
    return engine, scheduler, num_params


def check_precision(precision: str, device: torch.device) -> None:
    """ConfigError on a worker whose device cannot compute in `precision` (bf16 needs compute capability 8.0+)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(
            f"train.precision=bf16: GPU {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
            "has no bf16; use precision fp16 or fp32"
        )


def zero_stage_text(deepspeed_config: dict, zero_stage: int) -> str:
    """The ZeRO stage the engine runs, for the start line: `1`, or why it differs from the configured one."""
    stage = deepspeed_config["zero_optimization"]["stage"]
    if stage == zero_stage:
        return str(stage)
    return f"{stage} (zero_stage {zero_stage} shards nothing over one data-parallel rank)"
