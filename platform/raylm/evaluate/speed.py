"""Generation speed: tokens per second of greedy decoding with a KV cache, batch 1."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

from raylm.model.generate import generate


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_speed(
    model: torch.nn.Module, prompt_ids: Sequence[int], new_tokens: int, repeats: int = 3, device: str = "cpu"
) -> dict:
    """Median tokens/s over `repeats` greedy generations of `new_tokens` after `prompt_ids`, after one warm-up.

    The time covers the whole request (prefill of the prompt, then one step per new token), as a
    user of the model would see it. No eos token is passed, so every run makes exactly `new_tokens`.
    """
    generate(model, prompt_ids, max_new_tokens=new_tokens, temperature=0)  # warm-up: allocations, kernel choice
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = generate(model, prompt_ids, max_new_tokens=new_tokens, temperature=0)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        assert len(result.token_ids) == new_tokens, "generation stopped early without a stop token"
    median = statistics.median(seconds)
    return {"tokens_per_s": new_tokens / median, "generate_seconds": median}
