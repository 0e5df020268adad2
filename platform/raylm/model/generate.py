"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

    result = generate(model, prompt_ids, max_new_tokens=32, temperature=0.8, seed=0)
    for token in stream_generate(model, prompt_ids, max_new_tokens=32): ...
    results = generate_batch(model, [ids_a, ids_b], [SamplingParams(16), SamplingParams(32, temperature=0)])

The prompt is run once (prefill), then one token at a time against the cache. A batch
of prompts of different lengths is left-padded: `KVCache.left_pad` makes every row count
its positions from its own first token and hides the padding, so a row of a batch decodes
exactly as it would alone. Each row samples from its own seeded generator, so a seeded
request gives the same text whichever requests share its batch.

Stop tokens (and the eos token) end a sequence and are not part of its `token_ids`.
`finish_reason` is "stop" when a stop token or `SamplingParams.stop_check` ended it,
"length" when it reached max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from raylm.model.gpt import KVCache

__all__ = [
    "ContextLengthError",
    "GenerationResult",
    "SamplingParams",
    "Step",
    "decode_steps",
    "fit_prompt",
    "generate",
    "generate_batch",
    "stream_generate",
]


class ContextLengthError(ValueError):
    """The prompt plus the tokens to generate do not fit the model's context (block_size)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt."""

    max_new_tokens: int
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to at least top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Seed of this sequence's own generator; None draws from torch's global generator."""
    stop_token_ids: tuple[int, ...] = ()
    eos_token_id: int | None = None
    stop_check: Callable[[list[int]], bool] | None = field(default=None, compare=False)
    """Called with the tokens generated so far after each new one; True ends the sequence ("stop"),
    keeping that token. The serve stage checks stop strings with it."""
    truncate_prompt: bool = False
    """Drop the oldest prompt tokens when prompt + max_new_tokens exceeds block_size, instead of raising."""

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def stops(self) -> frozenset[int]:
        ids = set(self.stop_token_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids)


@dataclass
class GenerationResult:
    token_ids: list[int]
    """The generated tokens, without the prompt and without the stop token that ended them."""
    finish_reason: str
    """"stop" or "length"."""
    prompt_tokens: int = 0
    """Prompt tokens the model saw (fewer than given when truncate_prompt dropped some)."""


def _device(model: torch.nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def fit_prompt(prompt_ids: Sequence[int], params: SamplingParams, block_size: int) -> list[int]:
    """The prompt to run: checked against the context, truncated from the left when allowed."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt is empty: generation needs at least one token to condition on")
    if params.max_new_tokens >= block_size:
        raise ContextLengthError(
            f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt "
            f"in the model's context of {block_size} tokens"
        )
    room = block_size - params.max_new_tokens
    if len(prompt) > room:
        if not params.truncate_prompt:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} exceeds "
                f"the model's context of {block_size} tokens"
            )
        prompt = prompt[-room:]
    return prompt


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from the logits (V,) of the last position."""
    if params.temperature == 0 or params.top_k == 1:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Row:
    """Decoding state of one sequence in a batch."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.stops = params.stops
        self.generator = _generator(params.seed, device)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def push(self, token: int) -> bool:
        """Record a sampled token; True when the sequence is finished."""
        if token in self.stops:
            self.finish_reason = "stop"
            return True
        self.tokens.append(token)
        if self.params.stop_check is not None and self.params.stop_check(self.tokens):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None


def _select_rows(cache: KVCache, keep: torch.Tensor) -> None:
    """Keep only the batch rows `keep` (indices) in the cache, dropping finished sequences."""
    cache.layers = [None if kv is None else (kv[0][keep], kv[1][keep]) for kv in cache.layers]
    if cache.left_pad is not None:
        cache.left_pad = cache.left_pad[keep]


@dataclass(frozen=True)
class Step:
    """What one decoding step did to one row of the batch."""

    row: int
    token: int | None
    """The new token; None when the row ended on a stop token (or had nothing to generate)."""
    finish_reason: str | None
    """"stop" or "length" on the row's last step, else None."""


def decode_steps(
    model: torch.nn.Module, prompts: list[list[int]], params: list[SamplingParams]
) -> Iterator[list[Step]]:
    """Decode a batch of prompts that each fit the context (see `fit_prompt`).

    After each step, yield one Step per row still running; a finished row appears once more,
    with its finish_reason, then no more. This is the primitive under `generate_batch` and
    `stream_generate`, and what a server drives to stream a whole batch at once.

    Left padding makes every row as long as the longest prompt, so a batch runs in groups
    whose longest prompt plus largest max_new_tokens fit block_size; usually that is one group.
    """
    empty = [Step(i, None, "length") for i, p in enumerate(params) if p.max_new_tokens == 0]
    if empty:
        yield empty
    for group in _groups_that_fit(prompts, params, model.config.block_size):
        yield from _decode_group(model, prompts, params, group)


def _groups_that_fit(prompts: list[list[int]], params: list[SamplingParams], block_size: int) -> list[list[int]]:
    """Row indices in groups whose padded length plus the most new tokens of any row fits the context."""
    rows = sorted((i for i, p in enumerate(params) if p.max_new_tokens > 0), key=lambda i: len(prompts[i]))
    groups: list[list[int]] = []
    longest = most_new = 0
    for i in rows:
        new_longest, new_most = max(longest, len(prompts[i])), max(most_new, params[i].max_new_tokens)
        if groups and new_longest + new_most <= block_size:
            groups[-1].append(i)
            longest, most_new = new_longest, new_most
        else:
            groups.append([i])
            longest, most_new = len(prompts[i]), params[i].max_new_tokens
    return [sorted(g) for g in groups]


@torch.inference_mode()
def _decode_group(
    model: torch.nn.Module, prompts: list[list[int]], params: list[SamplingParams], active: list[int]
) -> Iterator[list[Step]]:
    """Decode the rows `active` of the batch together: prefill once, then one token per step."""
    device = _device(model)
    rows = {i: _Row(params[i], device) for i in active}
    pad = [max(len(prompts[i]) for i in active) - len(prompts[i]) for i in active]
    # Left-pad with token 0: padding is masked out and never read, any id does.
    idx = torch.tensor([[0] * n + prompts[i] for n, i in zip(pad, active)], dtype=torch.long, device=device)
    cache = KVCache(len(model.blocks), torch.tensor(pad, device=device) if any(pad) else None)
    logits, _ = model(idx, cache=cache)  # prefill: (B, T, V)
    last = logits[:, -1, :]
    while active:
        step, keep, next_ids = [], [], []
        for b, i in enumerate(active):
            token = sample_next(last[b], rows[i].params, rows[i].generator)
            done = rows[i].push(token)
            step.append(Step(i, None if token in rows[i].stops else token, rows[i].finish_reason))
            if not done:
                keep.append(b)
                next_ids.append(token)
        yield step
        if len(keep) < len(active):
            active = [active[b] for b in keep]
            if not active:
                break
            _select_rows(cache, torch.tensor(keep, device=device))
        logits, _ = model(torch.tensor(next_ids, device=device)[:, None], cache=cache)  # (B, 1, V)
        last = logits[:, -1, :]


def generate_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
) -> list[GenerationResult]:
    """Continue several prompts at once (one forward per step for the whole batch).

    `params` is one SamplingParams for all prompts or one per prompt. A row decodes the same
    tokens as it would alone (up to floating-point rounding of batched matmuls). Raises
    ContextLengthError / ValueError naming the first prompt that cannot be run.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    fitted = []
    for n, (prompt, p) in enumerate(zip(prompts, params)):
        try:
            fitted.append(fit_prompt(prompt, p, model.config.block_size))
        except ValueError as e:
            raise (type(e)(f"prompt {n}: {e}") if len(prompts) > 1 else e) from None
    results = [GenerationResult([], "length", len(p)) for p in fitted]
    for step in decode_steps(model, fitted, list(params)):
        for s in step:
            if s.token is not None:
                results[s.row].token_ids.append(s.token)
            if s.finish_reason is not None:
                results[s.row].finish_reason = s.finish_reason
    return results


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    eos_token_id: int | None = None,
    truncate_prompt: bool = False,
) -> GenerationResult:
    """Continue one prompt. Greedy when temperature == 0; raises ContextLengthError when it does not fit."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_token_ids=tuple(stop_token_ids),
        eos_token_id=eos_token_id,
        truncate_prompt=truncate_prompt,
    )
    return generate_batch(model, [prompt_ids], [params])[0]


def stream_generate(
    model: torch.nn.Module, prompt_ids: Sequence[int], params: SamplingParams | None = None, **kwargs
) -> Iterator[int]:
    """Yield the new token ids one at a time; the generator's return value is the finish reason.

    Takes a SamplingParams or the keyword arguments of `generate`. The prompt is checked before
    the first token is produced, so a bad request fails at the first `next()`.
    """
    if params is None:
        kwargs["stop_token_ids"] = tuple(kwargs.get("stop_token_ids", ()))
        params = SamplingParams(**kwargs)
    prompt = fit_prompt(prompt_ids, params, model.config.block_size)
    finish_reason = "length"
    for (s,) in decode_steps(model, [prompt], [params]):
        if s.token is not None:
            yield s.token
        finish_reason = s.finish_reason or finish_reason
    return finish_reason
