"""LoRA: low-rank adapters on the GPT's Linear layers, trained while the base weights stay frozen.

    model = apply_lora(GPT(cfg), rank=8, alpha=16.0, targets=("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    ...train: only the adapters' A and B require gradients...
    plain = merge_lora(model)      # a plain GPT with W + (alpha / rank) * B @ A in every adapted layer

A wrapped layer computes y = x W^T + (alpha / rank) * dropout(x) A^T B^T (Hu et al. 2021), with
A (rank, in) drawn like nn.Linear's own weight and B (out, rank) zero, so a fresh adapter
leaves the model's output unchanged. Merging folds the product into W: the merged model is
an ordinary raylm GPT, so evaluate, quantize and serve take it as any other.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.gate", "mlp.proj")
"""The GPT's adaptable Linear layers, by their name inside a block (mlp.gate exists only in a SwiGLU MLP)."""


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update of its weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        # A as nn.Linear initializes its weights (Kaiming uniform), B zero: B @ A = 0 at the start.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., rank) -> (..., out); never forms the (out, in) product
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return self.base(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale * B @ A (computed in fp32, stored in W's dtype)."""
        w = self.base.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=w.device, dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            delta = self.scale * (self.lora_b.float() @ self.lora_a.float())  # (out, in)
            linear.weight.copy_((w.float() + delta).to(w.dtype))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def _target_layers(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model's blocks whose name ends in one of `targets` (e.g. blocks.3.attn.qkv)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("blocks.") and name.endswith(tuple(f".{t}" for t in targets)):
            found[name] = module
    return found


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] | list[str],
               dropout: float = 0.0) -> nn.Module:  # fmt: skip
    """Wrap the GPT's `targets` Linear layers in LoRALinear (in place) and freeze every other parameter.

    `targets` are names from TARGETS; ValueError for an unknown name or one the model does not have
    (mlp.gate in a GELU MLP). Returns the model, whose only trainable parameters are the adapters'.
    """
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or '(none)'}: choose from {list(TARGETS)}")
    for t in targets:
        if not _target_layers(model, (t,)):
            raise ValueError(f"LoRA target {t!r}: the model has no such layer (mlp.gate needs mlp=swiglu)")
    model.requires_grad_(False)
    for name, linear in _target_layers(model, targets).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linear, rank, alpha, dropout))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every LoRALinear replaced by its merged nn.Linear: a plain GPT, all parameters trainable."""
    merged = model if inplace else copy.deepcopy(model)
    wrapped = [(name, m) for name, m in merged.named_modules() if isinstance(m, LoRALinear)]
    for name, lora in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent) if parent else merged, child, lora.merged())
    return merged.requires_grad_(True)


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable parameter count, total parameter count); tied weights count once."""
    params = list(model.parameters())  # parameters() yields a shared (tied) tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
