"""The GPT's shape: its config and the size presets, without torch, so that configs load fast.

raylm.model.gpt builds the model from a GPTConfig; the train stage's config names a preset and overrides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 4096
    """Rows of the token embedding; at least the tokenizer's vocabulary."""
    block_size: int = 256
    """Longest sequence the model attends over (learned positions)."""
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    dropout: float = 0.0
    bias: bool = False
    """Biases in Linear layers and LayerNorms (GPT-2 had them; most models since do not)."""
    positions: str = "learned"
    """"learned": a position embedding added to the input (GPT-2); "rotary": queries and keys
    rotated by their position (RoPE, as in LLaMA), no position parameters."""
    mlp: str = "gelu"
    """"gelu": Linear(4d) -> GELU -> Linear(d) (GPT-2); "swiglu": SiLU(gate) * up, hidden width
    8d/3 rounded up to a multiple of 32, so the parameter count stays close to the GELU MLP's."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    attention: str = "causal"
    """"causal": each token attends to itself and the tokens before it (a decoder that generates);
    "bidirectional": every token attends to the whole sequence (a masked-language-model encoder, BERT-style)."""

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {self.positions!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.attention not in ("causal", "bidirectional"):
            raise ValueError(f"attention must be 'causal' or 'bidirectional', got {self.attention!r}")
        if self.positions == "rotary" and (self.d_model // self.n_head) % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.d_model // self.n_head}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {sorted(unknown)}")
        return cls(**d)


# Size presets: (n_layer, n_head, d_model). `debug` trains on a CPU in seconds.
PRESETS: dict[str, dict] = {
    "debug": dict(n_layer=2, n_head=2, d_model=64),
    "demo": dict(n_layer=4, n_head=4, d_model=128),
    "10m": dict(n_layer=6, n_head=6, d_model=384),
    "125m": dict(n_layer=12, n_head=12, d_model=768),
    "350m": dict(n_layer=24, n_head=16, d_model=1024),
    "1b": dict(n_layer=24, n_head=16, d_model=2048),
}


def build_config(preset: str | None = None, **overrides) -> GPTConfig:
    """A GPTConfig from a size preset, with explicit fields taking precedence."""
    base = dict(PRESETS[preset]) if preset else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**base)
