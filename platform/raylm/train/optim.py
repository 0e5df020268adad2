"""The optimizer and its learning-rate schedule: AdamW, linear warmup, then cosine or linear decay."""

from __future__ import annotations

import functools
import math

import torch

from raylm.train.config import OptimizerConfig, TrainConfig


def lr_factor(step: int, opt: OptimizerConfig, max_steps: int) -> float:
    """Multiplier of the peak LR after `step` optimizer steps: linear warmup, then cosine or linear down to min_lr_ratio."""
    if step < opt.warmup_steps:
        return (step + 1) / (opt.warmup_steps + 1)
    span = max(1, max_steps - opt.warmup_steps)
    progress = min(1.0, (step - opt.warmup_steps) / span)
    remaining = 0.5 * (1.0 + math.cos(math.pi * progress)) if opt.decay == "cosine" else 1.0 - progress
    return opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * remaining


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings (>= 2-D) only, not on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optimizer.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # LoRA trains matrices only: ZeRO drops an empty group, and the LR schedule must see as many as it does
    groups = [g for g in groups if g["params"]]
    betas = (cfg.optimizer.beta1, cfg.optimizer.beta2)
    if cfg.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the host; DeepSpeed's vectorized CPU Adam is made for that.
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # loads DeepSpeed's op builders: only when offloading

        return DeepSpeedCPUAdam(groups, lr=cfg.optimizer.lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=betas, fused=cfg.use_gpu or None)


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of `cfg` (lr_factor over cfg.max_steps) on `optimizer`, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, opt=cfg.optimizer, max_steps=cfg.max_steps)
    )
