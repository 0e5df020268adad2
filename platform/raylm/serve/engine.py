"""One model's generation engine: an exported model, its tokenizer and batched, streamed decoding.

No Ray here: a Serve replica holds one Engine and feeds it batches; tests and scripts can
use it directly:

    engine = Engine("runs/demo/train/model", max_tokens_limit=256)
    engine.complete(CompletionJob(prompt="ROMEO. ", max_tokens=32, temperature=0))
    -> {"text": ..., "finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 32}

A batch streams as a list per decoding step with one entry per job: a delta
{"text", "finish_reason", "prompt_tokens", "completion_tokens"} while the job runs (its
last one carries the finish_reason), then None once it has finished. A job that asks for
log-probabilities also gets "logprobs": one entry per token of the step (see `token_logprob`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

from raylm.errors import InputError
from raylm.model.artifact import load_model
from raylm.model.generate import RunningBatch, SamplingParams
from raylm.serve.openai_api import APIError


@dataclass(frozen=True)
class CompletionJob:
    """One choice to generate, as the ingress sends it to a model replica (picklable)."""

    prompt: str | list[int]
    """Text, or token ids."""
    max_tokens: int | None = 16
    """None: as many as the context leaves room for, up to the engine's max_tokens_limit."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Sample from the k most likely tokens only; 0: all."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends where one appears, and the text excludes it."""
    echo: bool = False
    """Put the prompt's text before the completion."""
    param: str = "prompt"
    """The request field the prompt came from, named in errors ("messages" for chat)."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each token's, with the k most likely alternatives."""


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's alphabet: printable bytes stand for themselves, the others for 256 + i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


_BYTE_DECODER = _byte_decoder()


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The bytes a token stands for: exact for byte-level BPE, else the UTF-8 of its decoded text."""
    piece = tokenizer.id_to_token(token_id) or ""
    if piece and all(c in _BYTE_DECODER for c in piece):
        return [_BYTE_DECODER[c] for c in piece]
    return list(tokenizer.decode([token_id]).encode("utf-8"))


class TextStream:
    """The completion's text as tokens arrive: finds stop strings, emits only text that is final.

    Called after every new token (it is the SamplingParams.stop_check); `take` returns the text
    not yet sent, holding back an incomplete UTF-8 character and a tail that may begin a stop string.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.text = ""
        self.sent = 0

    def __call__(self, token_ids: list[int]) -> bool:
        text = self.tokenizer.decode(token_ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        self.text = text[: min(hits)] if hits else text
        return bool(hits)

    def take(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end = len(self.text.rstrip("\ufffd"))  # a multi-byte character still arriving
            end -= max((k for s in self.stops for k in range(1, len(s)) if self.text[:end].endswith(s[:k])), default=0)
        end = max(end, self.sent)
        delta, self.sent = self.text[self.sent : end], end
        return delta


@dataclass
class PreparedJob:
    """A job checked against the model: token ids, sampling parameters and its text stream."""

    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    prefix: str = ""
    """Text sent before the completion (the prompt, with echo)."""
    completion_tokens: int = field(default=0)


class Engine:
    """An exported model ready to complete prompts, alone or in batches."""

    def __init__(self, model_dir: str | os.PathLike, *, max_tokens_limit: int = 256, device: str = "cpu"):
        self.loaded = load_model(model_dir, device=device)
        if self.loaded.config.attention != "causal":
            raise InputError(f"{model_dir}: a masked-language model (bidirectional attention) cannot generate text to serve")
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.context_length = self.loaded.config.block_size
        self.max_tokens_limit = max_tokens_limit
        self.eos_token_id = self.loaded.eos_token_id

    def prepare(self, job: CompletionJob) -> PreparedJob:
        """Tokenize and check a job; APIError(400) when it cannot run (empty, too long, bad ids)."""
        if isinstance(job.prompt, str):
            prompt_ids = self.tokenizer.encode(job.prompt).ids
        else:
            prompt_ids = list(job.prompt)
            vocab = self.loaded.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt_ids):
                message = f"Token ids in the prompt must lie in [0, {vocab})"
                raise APIError(message, param=job.param, code="invalid_value")
        if not prompt_ids:
            raise APIError("The prompt is empty after tokenization", param=job.param, code="invalid_value")
        room = self.context_length - len(prompt_ids)
        max_tokens = min(self.max_tokens_limit, room) if job.max_tokens is None else job.max_tokens
        if max_tokens > self.max_tokens_limit:
            raise APIError(
                f"max_tokens is {max_tokens}; this server allows at most {self.max_tokens_limit}",
                param="max_tokens",
                code="invalid_value",
            )
        if room <= 0 or max_tokens > room:
            raise APIError(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{len(prompt_ids) + max(max_tokens, 1)} tokens ({len(prompt_ids)} in the {job.param}, "
                f"{max_tokens} for the completion). Please reduce the length of the {job.param} or the completion.",
                param=job.param,
                code="context_length_exceeded",
            )
        text = TextStream(self.tokenizer, tuple(job.stop))
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            top_k=job.top_k,
            seed=job.seed,
            eos_token_id=self.eos_token_id,
            stop_check=text,
            logprobs=job.logprobs,
        )
        prefix = ""
        if job.echo:
            prefix = job.prompt if isinstance(job.prompt, str) else self.tokenizer.decode(prompt_ids)
        return PreparedJob(prompt_ids, params, text, prefix)

    def batch(self) -> "EngineBatch":
        """An empty running batch of this engine's model, for jobs that join and leave as they come."""
        return EngineBatch(self)

    def stream_batch(self, jobs: list[PreparedJob]) -> Iterator[list[dict | None]]:
        """Decode the jobs together; after each step yield one entry per job (see the module docstring)."""
        batch = self.batch()
        batch.add(jobs)
        index = {id(job): i for i, job in enumerate(jobs)}
        while batch:
            out: list[dict | None] = [None] * len(jobs)
            for job, delta in batch.step():
                out[index[id(job)]] = delta
            yield out

    def token_logprob(self, step) -> dict:
        """{"token", "bytes", "logprob", "top": [{"token", "bytes", "logprob"}, ...]} of one generated token."""
        return {
            **self._token(step.token),
            "logprob": step.logprob,
            "top": [{**self._token(t), "logprob": lp} for t, lp in step.top_logprobs],
        }

    def _token(self, token_id: int) -> dict:
        # A byte-level BPE token can hold part of a UTF-8 character: its text then shows U+FFFD, its bytes are exact.
        return {"token": self.tokenizer.decode([token_id]), "bytes": token_bytes(self.tokenizer, token_id)}

    def complete(self, job: CompletionJob) -> dict:
        """Run one job to the end: {"text", "finish_reason", "prompt_tokens", "completion_tokens"} (and "logprobs")."""
        result = None
        for (delta,) in self.stream_batch([self.prepare(job)]):
            if delta is not None:
                result = delta if result is None else join_deltas(result, delta)
        return result

    def info(self) -> dict:
        return {
            "context_length": self.context_length,
            "quantization": self.loaded.meta.get("quantization"),
            "device": str(next(iter(self.model.parameters()), torch.empty(0)).device),
        }


def join_deltas(first: dict, then: dict) -> dict:
    """One delta with the text (and log-probabilities) of two consecutive deltas of a job."""
    joined = {**then, "text": first["text"] + then["text"]}
    if "logprobs" in first:
        joined["logprobs"] = [*first["logprobs"], *then["logprobs"]]
    return joined


class EngineBatch:
    """Prepared jobs decoded together, one token per step; jobs join between steps and leave when they finish.

    This is continuous batching: a server adds the jobs that arrived since the last step and
    calls `step()`, which returns a delta for every job that moved, in the shape of the module
    docstring; a job's last delta carries its finish_reason.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.running = RunningBatch(engine.model)
        self.jobs: dict[int, PreparedJob] = {}  # id(job) -> job: the running batch's row keys
        self._finished: list[tuple[PreparedJob, dict]] = []  # jobs with nothing to generate, answered next step
        self.last_step_tokens = 0
        """Tokens the last `step()` generated."""

    def __len__(self) -> int:
        return len(self.running) + len(self._finished)

    def add(self, jobs: list[PreparedJob]) -> None:
        """Prefill the jobs (one forward pass for all of them) into the running batch."""
        self.jobs.update((id(job), job) for job in jobs)
        for step in self.running.add([(id(job), job.prompt_ids, job.params) for job in jobs]):
            job = self.jobs.pop(step.row)
            self._finished.append((job, self._delta(job, step)))

    def drop(self, jobs: list[PreparedJob]) -> None:
        """Stop decoding these jobs (their clients went away)."""
        keys = [id(job) for job in jobs if id(job) in self.jobs]
        self.running.drop(keys)
        for key in keys:
            del self.jobs[key]

    def step(self) -> list[tuple[PreparedJob, dict]]:
        out, self._finished = self._finished, []
        steps = self.running.step()
        self.last_step_tokens = sum(step.token is not None for step in steps)
        for step in steps:
            job = self.jobs[step.row]
            out.append((job, self._delta(job, step)))
            if step.finish_reason is not None:
                del self.jobs[step.row]
        return out

    def _delta(self, job: PreparedJob, step) -> dict:
        if step.token is not None:
            job.completion_tokens += 1
        final = step.finish_reason is not None
        text = job.prefix + job.text.take(final)
        job.prefix = ""
        delta = {
            "text": text,
            "finish_reason": step.finish_reason,
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": job.completion_tokens,
        }
        if job.params.logprobs is not None:
            delta["logprobs"] = [] if step.token is None else [self.engine.token_logprob(step)]
        return delta
