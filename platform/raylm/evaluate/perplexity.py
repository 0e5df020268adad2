"""Validation perplexity and bits per byte of a model on packed token sequences."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from raylm.train.metrics import bits_per_byte  # shared with the train stage's val_bpb


@torch.inference_mode()
def sum_cross_entropy(model: torch.nn.Module, sequences: np.ndarray, batch_size: int, device: str = "cpu") -> tuple[float, int]:
    """(total nats, number of targets) of next-token prediction over (N, T + 1) sequences.

    Inputs are row[:-1], targets row[1:]; every target is scored with the row's earlier tokens as context.
    """
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = torch.from_numpy(sequences[start : start + batch_size]).to(device)
        logits, _ = model(batch[:, :-1])  # (B, T, V)
        targets = batch[:, 1:]
        total += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return total, count


def perplexity_metrics(total_nats: float, num_tokens: int, num_bytes: int | None = None) -> dict:
    """Mean token cross-entropy (nats), perplexity, and bits per byte when the byte count is known."""
    loss = total_nats / num_tokens
    out = {"val_loss": loss, "ppl": math.exp(loss), "val_tokens": num_tokens}
    if num_bytes:
        out["bits_per_byte"] = bits_per_byte(loss, num_tokens / num_bytes)
        out["val_bytes"] = num_bytes
    return out
