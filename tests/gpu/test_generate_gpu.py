"""Generation on a CUDA device: the cache, padding masks and seeded sampling (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from raylm.model.generate import SamplingParams, generate, generate_batch
from raylm.model.gpt import GPT, build_config


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(build_config("debug", vocab_size=97, block_size=48))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m.to("cuda").eval()


def test_cuda_greedy_with_cache_matches_full_recompute(model):
    prompt = [5, 17, 3, 88, 42]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            logits, _ = model(torch.tensor([ids], device="cuda"))
            ids.append(int(logits[0, -1].argmax()))
    assert generate(model, prompt, max_new_tokens=16, temperature=0).token_ids == ids[len(prompt) :]


def test_cuda_batched_equals_unbatched(model):
    prompts = [[3], [10, 20, 30, 40, 50, 60, 70], [5, 6, 7, 8]]
    params = [
        SamplingParams(12, temperature=0),
        SamplingParams(12, temperature=0.9, seed=4),
        SamplingParams(5, temperature=1.0, top_k=5, seed=9),
    ]
    alone = [generate_batch(model, [p], [sp])[0].token_ids for p, sp in zip(prompts, params)]
    assert [r.token_ids for r in generate_batch(model, prompts, params)] == alone
