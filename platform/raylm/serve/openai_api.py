"""The OpenAI HTTP API as raylm serves it: request schemas, response bodies, error bodies.

Pure pydantic and dicts, no Ray: the ingress parses with `parse_request`, and every failure
becomes an `APIError` whose body is OpenAI's `{"error": {"message", "type", "param", "code"}}`
with a 4xx status. Fields that OpenAI accepts but raylm cannot honour (penalties, logit_bias,
suffix, best_of > 1, logprobs with echo) are rejected with a message naming the field, rather than ignored.
`top_k` is accepted as vLLM accepts it (the OpenAI client sends it in `extra_body`).

Log-probabilities are the model's own (log-softmax of its logits, before temperature, top-k and top-p).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_CHOICES = 8
"""Largest `n` (times the number of prompts) one request may ask for."""
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
"""Longest stop sequence (the text stream checks every prefix of every stop after each token)."""
MAX_BODY_BYTES = 1 << 20
"""Largest request body; bigger ones are refused with a 413 before they are parsed."""
SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds torch's generators take (choice j of a request samples with seed + j)."""
MAX_COMPLETION_LOGPROBS = 5
"""Largest `logprobs` of /v1/completions (OpenAI's limit)."""
MAX_TOP_LOGPROBS = 20
"""Largest `top_logprobs` of /v1/chat/completions (OpenAI's limit)."""


class APIError(Exception):
    """A request the server refuses, with the HTTP status and the OpenAI error body to send."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_body(cls, body: dict, status: int = 400) -> "APIError":
        e = body["error"]
        return cls(e["message"], status=status, type=e["type"], param=e.get("param"), code=e.get("code"))


def model_not_found(name: str) -> APIError:
    return APIError(f"The model `{name}` does not exist", status=404, param="model", code="model_not_found")


def invalid_api_key() -> APIError:
    return APIError(
        "Incorrect or missing API key: send `Authorization: Bearer <key>`", status=401, code="invalid_api_key"
    )


class _Request(BaseModel):
    """Fields common to completions and chat; unknown fields are errors, as with OpenAI."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    """Sample from the k most likely tokens; 0 (or -1, vLLM's spelling) keeps all."""
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k_all(cls, v):
        return 0 if v == -1 and not isinstance(v, bool) else v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v != 0:
            raise ValueError("penalties are not supported by raylm; leave it at 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by raylm")
        return v

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @model_validator(mode="after")
    def _stream_one_choice(self):
        if self.stream and self.n != 1:
            raise ValueError("stream=true supports n=1 only")
        return self


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int]
    """One prompt (a string, a list of one or more strings, or a list of token ids)."""
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    """Log-probability of each generated token and of the `logprobs` most likely tokens at its place."""
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, str):
            v = [v]
        if len(v) == 0 or any(isinstance(p, str) and p == "" for p in v):
            raise ValueError("the prompt must not be empty")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, v):
        if v not in (None, 1):
            raise ValueError("best_of > 1 is not supported by raylm")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by raylm")
        return v

    @model_validator(mode="after")
    def _choices(self):
        if self.stream and len(self.prompts) != 1:
            raise ValueError("stream=true supports one prompt only")
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n must be at most {MAX_CHOICES}")
        if self.echo and self.logprobs is not None:
            raise ValueError("logprobs together with echo (log-probabilities of the prompt) is not supported by raylm")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt to complete: a string, or token ids."""
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]
    """A string, or content parts of which only `{"type": "text", "text": ...}` are supported."""
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        if isinstance(v, str):
            return v
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in v):
            raise ValueError("only text content parts are supported by raylm")
        return "".join(part["text"] for part in v)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    """Return the log-probability of each token of the reply."""
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """With logprobs: also the `top_logprobs` most likely tokens at each place."""

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def logprobs_k(self) -> int | None:
        """The engine's setting: None (no log-probabilities) or how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# How messages become one prompt for a base model: a plain transcript, and the model's
# turn ends where it starts writing the user's next line.
CHAT_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The transcript a base model continues: `Role: content` lines, ending with `Assistant:`."""
    lines = [f"{CHAT_ROLE_NAMES[m.role]}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


R = TypeVar("R", bound=_Request)


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if not isinstance(p, int) and not str(p).startswith("function-")]
    # Union members show up in the location (`prompt.str`, `prompt.list[int]`); the field is the first part.
    return parts[0] if parts else None


def parse_request(body: bytes, schema: type[R]) -> R:
    """Validate a JSON body against `schema`; APIError(400) naming the first bad field otherwise (413: too big)."""
    if len(body) > MAX_BODY_BYTES:
        raise APIError(f"The request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted",
                       status=413, code="request_too_large")  # fmt: skip
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"The request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError("The request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object")
    try:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"): valid JSON, but no text a tokenizer can take.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError("The request body holds a string that is not valid Unicode (a lone surrogate escape)") from None
    except RecursionError:
        raise APIError("The request body is not valid JSON: nested too deeply") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        return _raise_validation(e)


def _raise_validation(e: ValidationError):
    errors = e.errors()
    param = _param(errors[0]["loc"])
    # A union field fails once per member (`str`, `list[str]`, ...); a value error says more than those.
    same = [err for err in errors if _param(err["loc"]) == param]
    chosen = next((err for err in same if err["type"] == "value_error"), errors[0])
    message = chosen["msg"].removeprefix("Value error, ")
    if chosen["type"] == "extra_forbidden":
        message, code = f"Unrecognized request argument supplied: {param}", "unknown_parameter"
    elif chosen["type"] == "missing":
        message, code = f"Missing required parameter: '{param}'", "missing_required_parameter"
    else:
        message, code = (f"Invalid value for '{param}': {message}" if param else message), "invalid_value"
    raise APIError(message, param=param, code=code)


# --- response bodies --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(tokens: list[dict] | None, offset: int = 0) -> dict | None:
    """The legacy completions `logprobs` object of the engine's token entries (None when not asked for).

    text_offset: where each token's text starts, counted from `offset` (the characters sent before them).
    """
    if tokens is None:
        return None
    offsets, tops = [], []
    for t in tokens:
        offsets.append(offset)
        offset += len(t["token"])
        top: dict[str, float] = {}
        for alt in t["top"]:  # most likely first: of tokens showing the same text, the likeliest names it
            top.setdefault(alt["token"], alt["logprob"])
        tops.append(top)
    return {
        "tokens": [t["token"] for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(tokens: list[dict] | None) -> dict | None:
    """The chat `logprobs` object ({"content": [...], "refusal": None}) of the engine's token entries."""
    if tokens is None:
        return None

    def entry(t: dict) -> dict:
        return {"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}

    return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in t["top"]]} for t in tokens], "refusal": None}


def completion_body(id: str, model: str, choices: list[dict], usage_body: dict, created: int | None = None) -> dict:
    """A `text_completion`; choices hold {"text", "finish_reason"} (and "logprobs", the engine's entries) in order."""
    return {
        "id": id,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {"text": c["text"], "index": i, "logprobs": completion_logprobs(c.get("logprobs")),
             "finish_reason": c["finish_reason"]}
            for i, c in enumerate(choices)
        ],  # fmt: skip
        "usage": usage_body,
    }


def completion_chunk(
    id: str, model: str, created: int, text: str, finish_reason: str | None, logprobs: dict | None = None
) -> dict:
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def chat_body(id: str, model: str, choices: list[dict], usage_body: dict, created: int | None = None) -> dict:
    """A `chat.completion`; choices hold {"text", "finish_reason"} in order."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c["text"]},
                "logprobs": chat_logprobs(c.get("logprobs")),
                "finish_reason": c["finish_reason"],
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage_body,
    }


def chat_chunk(
    id: str, model: str, created: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None
) -> dict:
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(id: str, model: str, created: int, object: str, usage_body: dict) -> dict:
    """The last chunk of a stream when stream_options.include_usage is set: no choices, the usage."""
    return {"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage_body}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "raylm"}


def sse(payload: Any) -> str:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` ends a stream)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
