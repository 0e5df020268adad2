"""A GPT-style decoder, written for one device and read top to bottom.

Pre-norm transformer blocks with learned or rotary positions, a GELU or SwiGLU MLP,
tied input and output embeddings and `scaled_dot_product_attention`; causal attention for
a language model, or bidirectional attention for a masked-language-model encoder. Every weight
matrix is an `nn.Linear`, so dynamic int8 quantization and LoRA apply to it unchanged.
Parallelism (DeepSpeed ZeRO, pipeline stages) is applied from `raylm.train`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from raylm.model.config import PRESETS, GPTConfig, build_config  # noqa: F401 (the model's config, named here too)


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer, for incremental decoding."""

    def __init__(self, n_layer: int, left_pad: torch.Tensor | None = None):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        # (B,) count of padding tokens at the start of each row, for batches of prompts of
        # different lengths: those rows' positions start after their padding, which no token attends to.
        self.left_pad = left_pad

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].size(2)

    def padded_causal_mask(self, T: int, S: int) -> torch.Tensor:
        """(B, 1, T, S) bool mask for T new queries over S keys: causal, padding keys hidden.

        A padding query still sees itself, so its row is never empty (an empty row gives NaN,
        and a NaN value times a zero weight is still NaN in the next layer).
        """
        keys = torch.arange(S, device=self.left_pad.device)
        queries = torch.arange(S - T, S, device=self.left_pad.device)
        causal = keys[None, :] <= queries[:, None]  # (T, S)
        real = keys[None, :] >= self.left_pad[:, None]  # (B, S)
        mask = (causal[None] & real[:, None]) | (keys[None, :] == queries[:, None])[None]
        return mask[:, None]  # (B, 1, T, S)


def rotary_angles(pos: torch.Tensor, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the rotation angles for positions `pos` ((T,) or (B, T)), shaped to broadcast over heads.

    Channel pair i of a head turns by pos * theta^(-2i / head_size); the result is (T, hs/2) or (B, 1, T, hs/2).
    """
    inv_freq = theta ** (-torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size)
    angles = pos.to(torch.float32)[..., None] * inv_freq  # (..., T, hs/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (first half, second half) channel pair of x (B, nh, T, hs) by the given angles."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.causal = cfg.attention == "causal"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope: tuple | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:  # keys are cached rotated: a key's rotation depends only on its own position
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            past = cache.layers[layer]
            if past is not None:
                k = torch.cat([past[0], k], dim=2)
                v = torch.cat([past[1], v], dim=2)
            cache.layers[layer] = (k, v)
        # With a cache the T new queries sit at the end of the key sequence: a causal mask
        # aligned to the bottom right. is_causal aligns top-left, so it is only right for T == len(k).
        if cache is not None and cache.left_pad is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.padded_causal_mask(T, k.size(2)))
        elif k.size(2) == T:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            offset = k.size(2) - T
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=offset)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = swiglu_hidden(cfg.d_model) if self.swiglu else 4 * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias) if self.swiglu else None
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate(x)) * self.fc(x) if self.swiglu else F.gelu(self.fc(x))
        return self.drop(self.proj(h))


def swiglu_hidden(d_model: int) -> int:
    """SwiGLU's hidden width: 8d/3 (three matrices hold about what GELU's two of width 4d do), rounded up to 32."""
    hidden = 8 * d_model // 3
    return -(-hidden // 32) * 32


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope: tuple | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        self.activation_checkpointing = False
        """When training, keep only each block's input and recompute its activations in the backward pass."""
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V), mean cross-entropy against targets or None).

        Targets of -100 are ignored (prompt tokens in SFT, unmasked tokens in masked-LM training).

        With a `cache`, idx holds only the new tokens; their positions continue after the cached ones.
        """
        B, T = idx.shape
        if cache is not None and self.config.attention != "causal":
            raise ValueError("a bidirectional (masked-language-model) GPT does not generate: no KV-cache decoding")
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        if cache is not None and cache.left_pad is not None:
            pos = (pos - cache.left_pad[:, None]).clamp(min=0)  # (B, T): each row counts from its first real token
        rope = None
        if self.wpe is not None:
            x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        else:
            x = self.drop(self.wte(idx))
            c = self.config
            rope = rotary_angles(pos, c.d_model // c.n_head, c.rope_theta)
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, None, i, rope, use_reentrant=False)
            else:
                x = block(x, cache, i, rope)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token with `seq_len` tokens of context (default block_size), as in PaLM appendix B.

        6 per matmul weight (forward 2, backward 4): every nn.Linear, the tied lm_head counted once; embedding
        lookups and norms do no matmul. Plus 12 n_layer d_model seq_len for the attention scores and the
        weighted sum of values, counted over the full T x T matrix (the convention, although causal kernels skip half).
        """
        c = self.config
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_weights + 12 * c.n_layer * c.d_model * (seq_len or c.block_size)
