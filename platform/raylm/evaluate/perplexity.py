"""Validation perplexity and bits per byte of a model on packed token sequences."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


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


def target_bytes(tokenizer, sequences: np.ndarray) -> int:
    """UTF-8 bytes of the text the targets spell out, special tokens (end of text) excluded.

    Consecutive rows overlap by one token, so the targets of consecutive rows are one
    contiguous stretch of text: decoding them at once keeps multi-byte characters whole.
    """
    ids = sequences[:, 1:].reshape(-1).tolist()
    return len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))


def perplexity_metrics(total_nats: float, num_tokens: int, num_bytes: int | None = None) -> dict:
    """Mean token cross-entropy (nats), perplexity, and bits per byte when the byte count is known."""
    loss = total_nats / num_tokens
    out = {"val_loss": loss, "ppl": math.exp(loss), "val_tokens": num_tokens}
    if num_bytes:
        out["bits_per_byte"] = total_nats / (math.log(2) * num_bytes)
        out["val_bytes"] = num_bytes
    return out
