"""Config of the evaluate stage."""

from typing import Literal

from pydantic import Field

from raylm.configbase import ConfigSection


class EvaluateConfig(ConfigSection):
    models: dict[str, str]
    """Name -> exported model directory, one row of the table each; the first is the baseline of the relative columns."""
    data: str
    """The tokenize stage's output directory; its validation split is scored."""
    output: str
    """Directory for results.json and table.txt."""
    max_batches: int = Field(20, ge=1)
    """Validation batches scored per model."""
    batch_size: int = Field(8, ge=1)
    """Validation sequences per batch."""
    speed_prompt_tokens: int = Field(32, ge=1)
    """Prompt length (tokens, taken from the validation split) when measuring tokens/s."""
    speed_new_tokens: int = Field(64, ge=1)
    """Tokens generated (greedy, KV cache, batch 1) when measuring tokens/s."""
    speed_repeats: int = Field(3, ge=1)
    """Timed generations per model after one warm-up; the median is reported."""
    num_threads: int = Field(1, ge=1)
    """CPU threads of every model (torch.set_num_threads), the same for all so speeds compare;
    also the CPUs each model's Ray task reserves. One thread gives the steadiest batch-1 timings
    of small models on a shared machine; raise it for big models."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where float models run. int8 models always run on the CPU (their kernels are CPU-only);
    their row says so, and their speed then does not compare with the GPU rows."""
