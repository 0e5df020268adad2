"""Configs of the distill and quantize stages."""

from typing import Literal

from pydantic import Field

from raylm.configbase import ConfigSection
from raylm.train.config import ModelConfig, OptimizerConfig


class DistillConfig(ConfigSection):
    teacher: str
    """Exported teacher model directory (the train stage's output/model)."""
    data: str
    """The tokenize stage's output directory (the teacher's tokenizer)."""
    output: str
    """Directory for the student's run; the exported student lands in output/model."""
    student: ModelConfig = ModelConfig(preset="debug")
    optimizer: OptimizerConfig = OptimizerConfig()
    temperature: float = Field(2.0, gt=0.0)
    """Softmax temperature of the soft targets."""
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the KL term against the teacher; 1 - alpha weighs cross-entropy on the data."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel ranks); each holds a frozen copy of the teacher."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs each worker reserves from Ray."""
    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """DeepSpeed ZeRO stage of the student."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Student training precision; the teacher runs in the same dtype (fp16 needs GPUs)."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps to train the student for."""
    log_interval_steps: int = Field(10, ge=1)
    """Loss (with its KL and cross-entropy parts), learning rate and tokens/s every this many steps."""
    eval_interval_steps: int = Field(50, ge=1)
    """Student validation cross-entropy and perplexity every this many steps (and at the end)."""
    eval_batches: int = Field(8, ge=1)
    """Micro-batches per worker in one validation pass."""
    checkpoint_interval_steps: int = Field(50, ge=1)
    """DeepSpeed checkpoint of the student every this many steps (and at the end)."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train allows after a crash (-1: unlimited)."""


class QuantizeConfig(ConfigSection):
    input: str
    """Exported model directory to quantize."""
    output: str
    """Directory for the quantized model (output/model)."""
    method: Literal["int8_dynamic"] = "int8_dynamic"
    """int8_dynamic: int8 weights of every Linear layer, activations quantized on the fly."""
    tied_embedding: Literal["float32", "int8"] = "int8"
    """The token embedding, which the GPT also uses as its output projection (lm_head). float32:
    kept as trained, lm_head runs in float32. int8: one int8 table with a scale per row serves
    both the lookup and an int8 lm_head, stored once: a smaller file and a faster last layer
    (demo-size model, measured: 1.44 MB against 3.00 MB, perplexity +0.01% against "float32")."""
