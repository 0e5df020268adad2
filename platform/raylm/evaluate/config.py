"""Config of the evaluate stage."""

from pydantic import Field

from raylm.configbase import ConfigSection


class EvaluateConfig(ConfigSection):
    models: dict[str, str]
    """Name -> exported model directory, one row of the table each."""
    data: str
    """The tokenize stage's output directory; its validation split is scored."""
    output: str
    """Directory for results.json and table.txt."""
    max_batches: int = Field(20, ge=1)
    """Validation batches scored per model."""
    batch_size: int = Field(8, ge=1)
    speed_prompt_tokens: int = Field(32, ge=1)
    speed_new_tokens: int = Field(64, ge=1)
    """Tokens generated (greedy, KV cache) when measuring tokens/s."""
