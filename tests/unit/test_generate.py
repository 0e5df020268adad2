"""Incremental decoding: the KV cache, sampling controls, stop tokens and batches of uneven prompts."""

from __future__ import annotations

import pytest
import torch

from raylm.model.generate import (
    ContextLengthError,
    RunningBatch,
    SamplingParams,
    generate,
    generate_batch,
    stream_generate,
)
from raylm.model.gpt import GPT, build_config


@pytest.fixture(scope="module", params=[("learned", "gelu"), ("rotary", "swiglu")], ids=["gpt2-style", "llama-style"])
def model(request) -> GPT:
    torch.manual_seed(0)
    positions, mlp = request.param
    # A larger init spread than GPT-2's 0.02 so a random model's next tokens are far from ties.
    m = GPT(build_config("debug", vocab_size=97, block_size=48, positions=positions, mlp=mlp))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else None
    return m.eval()


def greedy_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Reference: recompute the full forward for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_with_cache_matches_full_recompute(model):
    prompt = [5, 17, 3, 88, 42]
    result = generate(model, prompt, max_new_tokens=20, temperature=0)
    assert result.token_ids == greedy_without_cache(model, prompt, 20)
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(prompt)


def test_seed_reproduces_samples_and_different_seeds_differ(model):
    kwargs = dict(max_new_tokens=24, temperature=1.0, top_p=0.95)
    a = generate(model, [1, 2, 3], seed=7, **kwargs).token_ids
    b = generate(model, [1, 2, 3], seed=7, **kwargs).token_ids
    c = generate(model, [1, 2, 3], seed=8, **kwargs).token_ids
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(model):
    prompt = [9, 8, 7]
    greedy = generate(model, prompt, max_new_tokens=12, temperature=0).token_ids
    assert generate(model, prompt, max_new_tokens=12, temperature=1.5, top_k=1, seed=3).token_ids == greedy


def test_tiny_top_p_is_greedy(model):
    prompt = [9, 8, 7]
    greedy = generate(model, prompt, max_new_tokens=12, temperature=0).token_ids
    assert generate(model, prompt, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3).token_ids == greedy


def test_stop_token_ends_generation_and_is_not_returned(model):
    prompt = [4, 4, 4]
    greedy = generate(model, prompt, max_new_tokens=10, temperature=0).token_ids
    stop = greedy[3]
    cut = greedy.index(stop)
    result = generate(model, prompt, max_new_tokens=10, temperature=0, stop_token_ids=[stop])
    assert result.token_ids == greedy[:cut]
    assert result.finish_reason == "stop"
    eos = generate(model, prompt, max_new_tokens=10, temperature=0, eos_token_id=stop)
    assert eos.token_ids == greedy[:cut] and eos.finish_reason == "stop"


def test_stop_check_keeps_the_token_that_triggered_it(model):
    params = SamplingParams(10, temperature=0, stop_check=lambda ids: len(ids) == 4)
    result = generate_batch(model, [[1, 2]], params)[0]
    assert len(result.token_ids) == 4 and result.finish_reason == "stop"


def test_batched_greedy_equals_unbatched(model):
    prompts = [[3], [10, 20, 30, 40, 50, 60, 70], [5, 6, 7, 8]]
    alone = [generate(model, p, max_new_tokens=15, temperature=0).token_ids for p in prompts]
    batched = generate_batch(model, prompts, SamplingParams(15, temperature=0))
    assert [r.token_ids for r in batched] == alone


def test_batched_rows_keep_their_own_params(model):
    prompts = [[3, 1], [10, 20, 30, 40], [5, 6, 7]]
    params = [
        SamplingParams(4, temperature=0),
        SamplingParams(12, temperature=0.9, seed=11),
        SamplingParams(7, temperature=1.0, top_k=5, seed=2),
    ]
    alone = [generate_batch(model, [p], [sp])[0] for p, sp in zip(prompts, params)]
    batched = generate_batch(model, prompts, params)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in batched] == [4, 12, 7]


def test_batch_whose_padded_length_exceeds_the_context(model):
    # 40 + 5 fits, 2 + 40 fits, but padding both to 40 and adding 40 would not (block_size 48).
    prompts = [list(range(1, 41)), [7, 7]]
    params = [SamplingParams(5, temperature=0), SamplingParams(40, temperature=0)]
    batched = generate_batch(model, prompts, params)
    assert [len(r.token_ids) for r in batched] == [5, 40]
    assert batched[1].token_ids == generate(model, [7, 7], max_new_tokens=40, temperature=0).token_ids


def test_stream_yields_the_same_tokens_and_returns_finish_reason(model):
    prompt = [12, 13, 14]
    expected = generate(model, prompt, max_new_tokens=9, temperature=0).token_ids
    stream = stream_generate(model, prompt, max_new_tokens=9, temperature=0)
    got = []
    while True:
        try:
            got.append(next(stream))
        except StopIteration as stop:
            reason = stop.value
            break
    assert got == expected and reason == "length"


def test_context_length_is_enforced(model):
    with pytest.raises(ContextLengthError, match="exceeds the model's context of 48"):
        generate(model, list(range(40)), max_new_tokens=10, temperature=0)
    truncated = generate(model, list(range(40)), max_new_tokens=10, temperature=0, truncate_prompt=True)
    assert truncated.prompt_tokens == 38 and len(truncated.token_ids) == 10
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], max_new_tokens=3, temperature=-1)


def test_zero_new_tokens(model):
    result = generate(model, [1, 2], max_new_tokens=0)
    assert result.token_ids == [] and result.finish_reason == "length"


def test_rows_that_join_a_running_batch_decode_as_they_would_alone(model):
    """Continuous batching: prompts join between steps, finished rows leave, the rest carry on unchanged."""
    jobs = {  # key: (prompt, max_new_tokens, step at which it joins)
        "a": ([5, 17, 3, 88, 42, 7, 9, 11], 30, 0),
        "b": ([1, 2], 6, 0),
        "c": ([60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71], 20, 3),  # longer than every running row
        "d": ([9], 35, 5),
        "e": ([4, 4, 4], 0, 5),
    }
    alone = {k: generate(model, p, max_new_tokens=n, temperature=0).token_ids for k, (p, n, _) in jobs.items()}
    batch, got, finished, step = RunningBatch(model), {k: [] for k in jobs}, {}, 0
    while step < 100 and (batch or step <= 5):
        for s in batch.add([(k, p, SamplingParams(n, temperature=0)) for k, (p, n, at) in jobs.items() if at == step]):
            finished[s.row] = s.finish_reason
        for s in batch.step():
            if s.token is not None:
                got[s.row].append(s.token)
            if s.finish_reason:
                finished[s.row] = s.finish_reason
        # The cache is never longer than its longest row: the context is what bounds a batch, not its history.
        if batch:
            assert batch.cache.length <= max(len(jobs[k][0]) + len(got[k]) for k in batch.keys)
        step += 1
    assert got == alone
    assert finished == {"a": "length", "b": "length", "c": "length", "d": "length", "e": "length"}


def test_a_row_dropped_from_a_running_batch_leaves_the_others_unchanged(model):
    alone = generate(model, [3, 1, 4, 1, 5], max_new_tokens=12, temperature=0).token_ids
    batch = RunningBatch(model)
    batch.add([("keep", [3, 1, 4, 1, 5], SamplingParams(12, temperature=0)), ("gone", [2, 7, 1, 8, 2, 8, 1, 8], SamplingParams(12, temperature=0))])
    tokens = []
    for n in range(12):
        if n == 4:
            batch.drop(["gone"])
        tokens += [s.token for s in batch.step() if s.row == "keep"]
    assert tokens == alone and not batch
