"""Config of the train stage: the model, the optimizer and the distributed run."""

from typing import Literal

from pydantic import Field, model_validator

from raylm.configbase import ConfigSection


class ModelConfig(ConfigSection):
    preset: str = "debug"
    """Size preset from raylm.model.gpt.PRESETS (debug, demo, 10m, 125m, 350m, 1b)."""
    n_layer: int | None = Field(None, ge=1)
    """Overrides the preset's number of blocks."""
    n_head: int | None = Field(None, ge=1)
    """Overrides the preset's number of attention heads."""
    d_model: int | None = Field(None, ge=8)
    """Overrides the preset's width."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _known_preset(self):
        from raylm.model.gpt import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        return self


class OptimizerConfig(ConfigSection):
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup from 0 to lr over this many optimizer steps."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW weight decay, applied to matrices only (not to norms, biases)."""
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value (0 turns clipping off)."""


class TrainConfig(ConfigSection):
    data: str
    """The tokenize stage's output directory."""
    output: str
    """Directory for checkpoints (Ray Train storage), metrics, the loss curve and the exported model (model/)."""
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """DeepSpeed ZeRO stage."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps to train for."""
    log_interval_steps: int = Field(10, ge=1)
    eval_interval_steps: int = Field(50, ge=1)
    """Validation loss and perplexity every this many steps (and at the end)."""
    eval_batches: int = Field(8, ge=1)
    """Micro-batches per worker in one validation pass."""
    checkpoint_interval_steps: int = Field(50, ge=1)
    """Save a DeepSpeed checkpoint through ray.train.Checkpoint every this many steps (and at the end)."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train allows after a crash (-1: unlimited)."""
