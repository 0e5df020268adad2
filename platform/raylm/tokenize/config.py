"""Config of the tokenize stage."""

from typing import Literal

from pydantic import Field, model_validator

from raylm.configbase import ConfigSection

BYTE_ALPHABET_SIZE = 256
"""Byte-level BPE starts from one token per byte value."""


class SftDataConfig(ConfigSection):
    """Supervised fine-tuning data (tokenize.format: sft): JSONL records of a prompt and its completion."""

    prompt_field: str = "prompt"
    """The JSON key holding the prompt text."""
    completion_field: str = "completion"
    """The JSON key holding the completion text."""
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of the examples in the validation split, chosen by a seeded hash of each example (run.seed)."""
    too_long: Literal["truncate_prompt", "drop", "error"] = "truncate_prompt"
    """An example longer than a row (prompt + completion + end-of-text > seq_len + 1 tokens): keep the prompt's
    last tokens ("truncate_prompt"; one whose completion alone does not fit is dropped), drop it, or stop
    with an error naming its file and line. Counted in the manifest either way."""
    on_error: Literal["error", "skip"] = "error"
    """A malformed line (bad JSON, a missing or non-string field, an empty prompt): stop with an error naming
    file:line, or skip it and count it (the first few locations land in the manifest)."""


class TokenizeConfig(ConfigSection):
    input: str
    """The prepare stage's output directory (train/ and validation/ Parquet shards); with format sft, a JSONL
    file of prompt/completion records or a directory of *.jsonl files."""
    format: Literal["pretrain", "sft"] = "pretrain"
    """"pretrain": packed documents, every token a target; "sft": one prompt/completion example per row, padded,
    with a loss mask that makes only the completion (and its end-of-text) targets. sft needs `tokenizer`."""
    sft: SftDataConfig = SftDataConfig()
    output: str
    """Directory for tokenizer.json, the packed token shards (train/, validation/) and manifest.json."""
    tokenizer: str | None = None
    """Use this existing tokenizer instead of training one: a tokenizer.json file, or a directory holding
    tokenizer.json, or GPT-2 style vocab.json + merges.txt (or GPT-2's own encoder.json + vocab.bpe).
    Special tokens it lacks are added after its vocabulary; vocab_size and min_frequency are then unused."""
    vocab_size: int = Field(4096, ge=260)
    """Size of the byte-level BPE vocabulary, special tokens included (at least 256 bytes + the special tokens)."""
    min_frequency: int = Field(2, ge=1)
    """A pair must occur this often to be merged."""
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)
    """Special tokens; the first one ends every document in packed sequences (its id is the eos_token_id)."""
    seq_len: int = Field(256, ge=8)
    """Tokens per packed training sequence (the model's context); rows hold seq_len + 1 ids."""
    tokenizer_sample_docs: int | None = Field(None, ge=1)
    """Train the tokenizer on at most this many documents of the train split, the first in order (all when unset)."""
    batch_size: int = Field(1024, ge=1)
    """Documents per Ray Data batch when encoding: one `encode_batch` call in an encoding actor."""
    encode_actors: int = Field(2, ge=1)
    """Encoding actors (Ray Data actor pool size); each loads the tokenizer once."""
    encode_cpus_per_actor: int = Field(1, ge=1)
    """CPUs each encoding actor reserves; also its `tokenizers` thread count (RAYON_NUM_THREADS)."""
    max_piece_chars: int = Field(65536, ge=64)
    """Documents longer than this many characters are cut (at whitespace) into pieces encoded as separate
    rows, so one huge document cannot stall an actor; the ids are the same as the whole document's."""
    shard_rows: int = Field(8192, ge=1)
    """Packed sequences per .npy shard file."""

    @model_validator(mode="after")
    def _sft_needs_tokenizer(self):
        if self.format == "sft" and self.tokenizer is None:
            raise ValueError("format sft encodes with the base model's tokenizer: set tokenizer (e.g. <train output>/model)")
        return self

    @model_validator(mode="after")
    def _needs_separator(self):
        if not self.special_tokens:
            raise ValueError("special_tokens needs at least one token (the document separator)")
        if any(not t for t in self.special_tokens) or len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError("special_tokens must be distinct, non-empty strings")
        return self

    @model_validator(mode="after")
    def _vocab_holds_bytes_and_specials(self):
        needed = BYTE_ALPHABET_SIZE + len(self.special_tokens)
        if self.vocab_size < needed:
            raise ValueError(
                f"vocab_size {self.vocab_size} is too small: byte-level BPE needs {BYTE_ALPHABET_SIZE} byte tokens "
                f"+ {len(self.special_tokens)} special tokens = {needed}"
            )
        return self
