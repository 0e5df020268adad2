"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

    result = generate(model, prompt_ids, max_new_tokens=32, temperature=0.8, seed=0)
    for token in stream_generate(model, prompt_ids, max_new_tokens=32): ...
    results = generate_batch(model, [ids_a, ids_b], [SamplingParams(16), SamplingParams(32, temperature=0)])

The prompt is run once (prefill), then one token at a time against the cache. A batch
of prompts of different lengths is left-padded: `KVCache.left_pad` makes every row count
its positions from its own first token and hides the padding, so a row of a batch decodes
exactly as it would alone. `RunningBatch` lets sequences join a batch that is already
decoding and leave it when they finish (continuous batching, as a server needs). Each row samples from its own seeded generator, so a seeded
request gives the same text whichever requests share its batch.

Stop tokens (and the eos token) end a sequence and are not part of its `token_ids`.
`finish_reason` is "stop" when a stop token or `SamplingParams.stop_check` ended it,
"length" when it reached max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from raylm.model.gpt import KVCache

__all__ = [
    "ContextLengthError",
    "GenerationResult",
    "RunningBatch",
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
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each Step carries its token's log-probability and the k most likely
    tokens with theirs, under the model's own distribution (log-softmax of the logits, before temperature,
    top-k and top-p reshape it for sampling)."""

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

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


@dataclass(frozen=True)
class Step:
    """What one decoding step did to one row of the batch."""

    row: int
    """The caller's key of the row (its index in the batch for `decode_steps`)."""
    token: int | None
    """The new token; None when the row ended on a stop token (or had nothing to generate)."""
    finish_reason: str | None
    """"stop" or "length" on the row's last step, else None."""
    logprob: float | None = None
    """log p(token) under the model, when the row's SamplingParams.logprobs is set (also for a stop token)."""
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """The SamplingParams.logprobs most likely (token id, log p), most likely first."""


class RunningBatch:
    """Sequences decoded together one token per step, which join and leave between steps (continuous batching).

        batch = RunningBatch(model)
        batch.add([(key, prompt_ids, params), ...])   # prefilled together, then merged into the running rows
        while batch: steps = batch.step()             # one Step per row; finished rows leave the batch

    Every row's cache is right-aligned: the newest token of each row is the last column, and the
    columns before a row's first token are padding (`KVCache.left_pad`) that no query attends to
    and that does not count in the row's positions. Rows that join are left-padded to the batch's
    length (or the batch to theirs), and columns that are padding in every row are cut off, so the
    cache is always as long as its longest row: any rows that each fit the context fit together.
    A row decodes the same tokens as it would alone (up to floating-point rounding of batched matmuls).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = _device(model)
        self.keys: list = []
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None
        self.last: torch.Tensor | None = None
        """(B, V) logits of each row's next token."""

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, items: Sequence[tuple]) -> list[Step]:
        """Prefill (key, prompt_ids, params) items, each fitting the context (see `fit_prompt`), into the batch.

        Returns the Steps of items with nothing to generate (max_new_tokens 0): those do not join.
        """
        done = [Step(key, None, "length") for key, _, p in items if p.max_new_tokens == 0]
        items = [it for it in items if it[2].max_new_tokens > 0]
        if not items:
            return done
        longest = max(len(prompt) for _, prompt, _ in items)
        pad = [longest - len(prompt) for _, prompt, _ in items]
        # Left-pad with token 0: padding is masked out and never read, any id does.
        idx = torch.tensor([[0] * n + list(prompt) for n, (_, prompt, _) in zip(pad, items)], device=self.device)
        cache = KVCache(len(self.model.blocks), torch.tensor(pad, device=self.device) if any(pad) else None)
        logits, _ = self.model(idx, cache=cache)  # prefill: (B, T, V)
        self._merge(cache, logits[:, -1, :])
        self.keys += [key for key, _, _ in items]
        self.rows += [_Row(p, self.device) for _, _, p in items]
        return done

    def _merge(self, cache: KVCache, last: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.last = cache, last
            return
        length = max(self.cache.length, cache.length)
        layers, pads = [], []
        for c in (self.cache, cache):
            extra = length - c.length
            pad = c.left_pad if c.left_pad is not None else torch.zeros(len(c.layers[0][0]), dtype=torch.long, device=self.device)
            pads.append(pad + extra)
            layers.append([tuple(F.pad(t, (0, 0, extra, 0)) for t in kv) if extra else kv for kv in c.layers])
        self.cache.layers = [tuple(torch.cat(pair) for pair in zip(a, b)) for a, b in zip(*layers)]
        self.cache.left_pad = torch.cat(pads)
        self.last = torch.cat([self.last, last])
        self._trim()

    def _trim(self) -> None:
        """Cut the columns that are padding in every row; no left_pad at all once no row has any."""
        pad = self.cache.left_pad
        if pad is None:
            return
        common = int(pad.min())
        if common:
            self.cache.layers = [(k[:, :, common:], v[:, :, common:]) for k, v in self.cache.layers]
            pad = pad - common
        self.cache.left_pad = pad if bool(pad.any()) else None

    def keep(self, rows: list[int]) -> None:
        """Keep only the batch rows at these indices (in this order), dropping the others' state."""
        if len(rows) == len(self.rows):
            return
        self.keys = [self.keys[b] for b in rows]
        self.rows = [self.rows[b] for b in rows]
        if not rows:
            self.cache = self.last = None
            return
        index = torch.tensor(rows, device=self.device)
        self.cache.layers = [(k[index], v[index]) for k, v in self.cache.layers]
        if self.cache.left_pad is not None:
            self.cache.left_pad = self.cache.left_pad[index]
        self.last = self.last[index]
        self._trim()

    def drop(self, keys) -> None:
        """Remove the rows of these keys (a client that went away), unfinished."""
        gone = set(keys)
        self.keep([b for b, key in enumerate(self.keys) if key not in gone])

    @torch.inference_mode()
    def step(self) -> list[Step]:
        """Sample one token for every row; finished rows leave; the others run one forward pass together."""
        if not self.rows:
            return []
        want = [row.params.logprobs is not None for row in self.rows]
        logprobs = torch.log_softmax(self.last.float(), dim=-1) if any(want) else None
        steps, keep, next_ids = [], [], []
        for b, (key, row) in enumerate(zip(self.keys, self.rows)):
            token = sample_next(self.last[b], row.params, row.generator)
            finished = row.push(token)
            s = Step(key, None if token in row.stops else token, row.finish_reason)
            if want[b]:
                s = _with_logprobs(s, logprobs[b], token, row.params.logprobs)
            steps.append(s)
            if not finished:
                keep.append(b)
                next_ids.append(token)
        self.keep(keep)
        if self.rows:
            logits, _ = self.model(torch.tensor(next_ids, device=self.device)[:, None], cache=self.cache)  # (B, 1, V)
            self.last = logits[:, -1, :]
        return steps


def decode_steps(
    model: torch.nn.Module, prompts: list[list[int]], params: list[SamplingParams]
) -> Iterator[list[Step]]:
    """Decode a batch of prompts that each fit the context (see `fit_prompt`), all prefilled together.

    After each step, yield one Step per row still running (Step.row: the prompt's index); a
    finished row appears once more, with its finish_reason, then no more. Rows with
    max_new_tokens 0 come first, in a step of their own. This is the primitive under
    `generate_batch` and `stream_generate`; a server that lets requests join a running batch
    drives a `RunningBatch` itself.
    """
    batch = RunningBatch(model)
    empty = batch.add([(i, prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))])
    if empty:
        yield empty
    while batch:
        yield batch.step()


def _with_logprobs(step: Step, logprobs: torch.Tensor, token: int, k: int) -> Step:
    top = ()
    if k > 0:
        values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
        top = tuple(zip(ids.tolist(), values.tolist()))
    return Step(step.row, step.token, step.finish_reason, float(logprobs[token]), top)


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
