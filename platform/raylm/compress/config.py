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
    zero_stage: Literal[0, 1, 2, 3] = 1
    micro_batch_size: int = Field(8, ge=1)
    max_steps: int = Field(100, ge=1)
    eval_interval_steps: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)


class QuantizeConfig(ConfigSection):
    input: str
    """Exported model directory to quantize."""
    output: str
    """Directory for the quantized model (output/model)."""
    method: Literal["int8_dynamic"] = "int8_dynamic"
    """int8_dynamic: int8 weights of every Linear layer, activations quantized on the fly."""
    lm_head: bool = False
    """Quantize the output projection too. It shares its weight with the token embedding, which
    stays float32, so this stores a second (int8) copy of that matrix: a bigger file and a higher
    perplexity for a faster last layer."""
