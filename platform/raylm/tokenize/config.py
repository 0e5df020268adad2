"""Config of the tokenize stage."""

from pydantic import Field, model_validator

from raylm.configbase import ConfigSection


class TokenizeConfig(ConfigSection):
    input: str
    """The prepare stage's output directory (train/ and validation/ Parquet shards)."""
    output: str
    """Directory for tokenizer.json, the packed token shards (train/, validation/) and stats.json."""
    vocab_size: int = Field(4096, ge=260)
    """Size of the byte-level BPE vocabulary, special tokens included."""
    min_frequency: int = Field(2, ge=1)
    """A pair must occur this often to be merged."""
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)
    """Special tokens; the first one separates documents in packed sequences."""
    seq_len: int = Field(256, ge=8)
    """Tokens per packed training sequence (the model's context)."""
    tokenizer_sample_docs: int | None = Field(None, ge=1)
    """Train the tokenizer on at most this many documents of the train split (all when unset)."""
    batch_size: int = Field(256, ge=1)
    """Documents per Ray Data batch when encoding."""

    @model_validator(mode="after")
    def _needs_separator(self):
        if not self.special_tokens:
            raise ValueError("special_tokens needs at least one token (the document separator)")
        return self
