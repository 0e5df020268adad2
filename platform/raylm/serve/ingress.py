"""The HTTP ingress: OpenAI's routes on FastAPI, in front of one model deployment per model.

    HTTP ──▶ OpenAIIngress (auth, validation, SSE) ──handle──▶ model-<name>  (raylm.serve.replica.ModelServer)

The ingress parses and checks a request, turns it into generation jobs (`generation_jobs`), sends
them to the model's deployment and either forwards the deltas as server-sent events or joins them
into one body. Every answered request is counted, by route, model and status, in Ray metrics
(exported as ray_raylm_*), with time to first token and time per output token.
"""

import asyncio
import hmac
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm.serve.config import ServeConfig
from raylm.serve.engine import CompletionJob, join_deltas
from raylm.serve.openai_api import (
    CHAT_STOP,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    chat_logprobs,
    chat_prompt,
    completion_body,
    completion_chunk,
    completion_logprobs,
    invalid_api_key,
    model_not_found,
    new_id,
    parse_request,
    sse,
    usage,
    usage_chunk,
)

logger = logging.getLogger("ray.serve")

api = FastAPI(title="raylm", description="OpenAI-compatible completions from raylm models.")

_MS_BOUNDARIES = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class IngressMetrics:
    """The ingress's Ray metrics (exported to the Ray dashboard's Prometheus endpoint as ray_raylm_*)."""

    def __init__(self):
        self.requests = Counter(
            "raylm_requests", "HTTP requests answered, by route, model and status code.",
            tag_keys=("route", "model", "status"),
        )  # fmt: skip
        self.errors = Counter(
            "raylm_request_errors", "Requests answered with an error (4xx or 5xx), by route, status and error code.",
            tag_keys=("route", "status", "code"),
        )  # fmt: skip
        self.ttft = Histogram(
            "raylm_time_to_first_token_ms", "From a request's arrival to its first generated token.",
            boundaries=_MS_BOUNDARIES, tag_keys=("model",),
        )  # fmt: skip
        self.tpot = Histogram(
            "raylm_time_per_output_token_ms", "Mean time between a request's output tokens after the first.",
            boundaries=_MS_BOUNDARIES, tag_keys=("model",),
        )  # fmt: skip


_metrics: list[IngressMetrics] = []


def ingress_metrics() -> IngressMetrics:
    """This process's IngressMetrics, made on first use (in the ingress replica: Ray metrics need its Ray worker).

    A function of this module, not a global the ingress class assigns: Serve pickles the deployment
    class by value, with its own copy of the module globals, while the middleware below runs here.
    """
    if not _metrics:
        _metrics.append(IngressMetrics())
    return _metrics[0]


class _CountRequests:
    """ASGI middleware counting every answered request by route, model, status (and error code).

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware copies every
    chunk of a streamed response through a memory stream of its own, a cost paid per token here.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})  # the routes' request.state writes into this dict
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics = ingress_metrics()
            # The route's template ("/v1/models/{model}"), not the path: a client cannot grow the tag set.
            route = getattr(scope.get("route"), "path", "other")
            tags = {"route": route, "model": state.get("model") or "", "status": str(status)}
            metrics.requests.inc(tags=tags)
            if status >= 400:
                metrics.errors.inc(tags={"route": route, "status": str(status), "code": state.get("error_code") or ""})


api.add_middleware(_CountRequests)


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    request.state.error_code = e.code
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods, in OpenAI's error shape rather than FastAPI's {"detail"}.
    body = APIError(str(e.detail), status=e.status_code, code="not_found" if e.status_code == 404 else None).body()
    return JSONResponse(body, status_code=e.status_code)


def _server_error(e: Exception) -> APIError:
    logger.exception("raylm serve: request failed")
    return APIError(f"The server failed to generate: {type(e).__name__}", status=500, type="server_error")


def generation_jobs(req: CompletionRequest | ChatCompletionRequest) -> list[CompletionJob]:
    """The jobs of a request: `req.n` choices of each prompt, prompt after prompt; choice j samples with seed + j.

    A chat request is one prompt (its messages as a transcript) that stops where the user's next
    turn would start, and names `messages` in its errors; only a completion request echoes.
    """
    if isinstance(req, ChatCompletionRequest):
        prompts, max_tokens, stop = [chat_prompt(req.messages)], req.token_budget, (*req.stops, CHAT_STOP)
        per_kind = {"param": "messages", "logprobs": req.logprobs_k}
    else:
        prompts, max_tokens, stop = req.prompts, req.max_tokens, tuple(req.stops)
        per_kind = {"echo": req.echo, "logprobs": req.logprobs}
    return [
        CompletionJob(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=None if req.seed is None else req.seed + j,
            stop=stop,
            **per_kind,
        )
        for prompt in prompts
        for j in range(req.n)
    ]


async def _deltas(first: dict, stream) -> AsyncIterator[dict]:
    """The delta already read, then the rest of the stream.

    Defined above the deployment, as generation_jobs is: Serve captures a deployment class, and
    the module globals it uses, when the decorator runs.
    """
    yield first
    async for delta in stream:
        yield delta


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    """OpenAI routes: /v1/completions, /v1/chat/completions, /v1/models, /health."""

    def __init__(
        self, models: dict[str, DeploymentHandle], cards: dict[str, dict], serve_cfg: ServeConfig, app_name: str
    ):
        self.handles = models
        self.models = {name: handle.options(stream=True) for name, handle in models.items()}
        self.cards = cards
        self.api_key = serve_cfg.api_key
        self.max_tokens_limit = serve_cfg.max_tokens_limit
        self.app_name = app_name
        self.metrics = ingress_metrics()

    # -- helpers --

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise invalid_api_key()

    def _check_model(self, request: Request, name: str) -> None:
        """404 for a model this app does not serve; else the request's metrics are tagged with it."""
        if name not in self.models:
            raise model_not_found(name)
        request.state.model = name

    def _check_max_tokens(self, max_tokens: int | None, param: str = "max_tokens") -> None:
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise APIError(
                f"max_tokens is {max_tokens}; this server allows at most {self.max_tokens_limit}",
                param=param,
                code="invalid_value",
            )

    async def _open(self, model: str, job: CompletionJob, arrived: float) -> tuple[dict, AsyncIterator[dict], float]:
        """Start a job and read its first delta, so that a bad job becomes an HTTP error before any stream.

        Returns the delta, the rest of the stream, and when the first token came (time.perf_counter).
        """
        stream = self.models[model].generate.remote(job)
        try:
            first = await stream.__anext__()
        except Exception as e:  # a replica crash, not a bad request
            raise _server_error(e) from None
        if "error" in first:
            raise APIError.from_body(first["error"], first["status"])
        first_token = time.perf_counter()
        if first["completion_tokens"]:
            self.metrics.ttft.observe(1000 * (first_token - arrived), tags={"model": model})
        return first, stream, first_token

    def _finished(self, model: str, first_token: float, last: dict) -> None:
        """Time per output token of a finished job: the tokens after the first, over the time they took."""
        if last["completion_tokens"] > 1:
            tpot = (time.perf_counter() - first_token) / (last["completion_tokens"] - 1)
            self.metrics.tpot.observe(1000 * tpot, tags={"model": model})

    async def _collect(self, model: str, job: CompletionJob, arrived: float) -> dict:
        first, stream, first_token = await self._open(model, job, arrived)
        result = first
        try:
            async for delta in stream:
                result = join_deltas(result, delta)
        except Exception as e:
            raise _server_error(e) from None
        self._finished(model, first_token, result)
        return result

    async def _gather(self, model: str, jobs: list[CompletionJob], arrived: float) -> list[dict]:
        # Sent together, so that they join the same replica batch.
        return list(await asyncio.gather(*(self._collect(model, job, arrived) for job in jobs)))

    @staticmethod
    def _usage(results: list[dict], n: int) -> dict:
        prompt_tokens = sum(r["prompt_tokens"] for r in results[::n])  # each prompt counts once, not per choice
        return usage(prompt_tokens, sum(r["completion_tokens"] for r in results))

    # -- routes --

    @api.get("/health")
    async def health(self) -> dict:
        """Liveness: the ingress answers (Serve restarts replicas that stop answering its own checks)."""
        return {"status": "ok", "app": self.app_name, "models": sorted(self.models)}

    @api.get("/ready")
    async def ready(self):
        """Readiness: 200 once every model has a replica that answers within 5 s, else 503 naming the ones that do not."""

        async def answers(name: str) -> bool:
            try:
                await asyncio.wait_for(self.handles[name].info.remote(), timeout=5.0)
                return True
            except Exception:
                return False

        names = sorted(self.handles)
        ok = await asyncio.gather(*(answers(n) for n in names))
        if all(ok):
            return {"status": "ready", "models": names}
        waiting = [n for n, up in zip(names, ok) if not up]
        body = APIError(f"Models not ready: {', '.join(waiting)}", status=503, type="server_error", code="not_ready").body()
        return JSONResponse({**body, "status": "not_ready", "models": names, "not_ready": waiting}, status_code=503)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [self.cards[name] for name in sorted(self.cards)]}

    @api.get("/v1/models/{model}")
    async def get_model(self, model: str, request: Request) -> dict:
        self._authorize(request)
        self._check_model(request, model)
        return self.cards[model]

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        arrived = time.perf_counter()
        self._authorize(request)
        req = parse_request(await request.body(), CompletionRequest)
        self._check_model(request, req.model)
        self._check_max_tokens(req.max_tokens)
        jobs = generation_jobs(req)
        if req.stream:
            first, stream, first_token = await self._open(req.model, jobs[0], arrived)
            events = self._completion_events(req, first, stream, first_token)
            return StreamingResponse(events, media_type="text/event-stream")
        results = await self._gather(req.model, jobs, arrived)
        return completion_body(new_id("cmpl"), req.model, results, self._usage(results, req.n))

    async def _completion_events(self, req: CompletionRequest, first: dict, stream, first_token: float) -> AsyncIterator[str]:
        id, created, last = new_id("cmpl"), int(time.time()), first
        pending, offset = [], 0  # log-probabilities of tokens whose text is still held back go with the next chunk
        try:
            async for delta in _deltas(first, stream):
                last = delta
                pending.extend(delta.get("logprobs", ()))
                if delta["text"] or delta["finish_reason"]:
                    logprobs = completion_logprobs(pending, offset) if req.logprobs is not None else None
                    offset += len(delta["text"])
                    pending = []
                    yield sse(completion_chunk(id, req.model, created, delta["text"], delta["finish_reason"], logprobs))
        except Exception as e:
            yield sse(_server_error(e).body())
        self._finished(req.model, first_token, last)
        if req.include_usage:
            body = usage(last["prompt_tokens"], last["completion_tokens"])
            yield sse(usage_chunk(id, req.model, created, "text_completion", body))
        yield sse("[DONE]")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        arrived = time.perf_counter()
        self._authorize(request)
        req = parse_request(await request.body(), ChatCompletionRequest)
        self._check_model(request, req.model)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        self._check_max_tokens(req.token_budget, param)
        jobs = generation_jobs(req)
        if req.stream:
            first, stream, first_token = await self._open(req.model, jobs[0], arrived)
            return StreamingResponse(self._chat_events(req, first, stream, first_token), media_type="text/event-stream")
        results = await self._gather(req.model, jobs, arrived)
        for r in results:
            r["text"] = r["text"].strip()  # the transcript puts a space after "Assistant:"
        return chat_body(new_id("chatcmpl"), req.model, results, self._usage(results, req.n))

    async def _chat_events(self, req: ChatCompletionRequest, first: dict, stream, first_token: float) -> AsyncIterator[str]:
        id, created, last = new_id("chatcmpl"), int(time.time()), first
        yield sse(chat_chunk(id, req.model, created, {"role": "assistant", "content": ""}, None))
        started = False  # the first words of the reply lose their leading space
        pending = []  # log-probabilities of tokens whose text is still held back go with the next chunk
        try:
            async for delta in _deltas(first, stream):
                last = delta
                pending.extend(delta.get("logprobs", ()))
                text = delta["text"] if started else delta["text"].lstrip()
                started = started or bool(text)
                if text:
                    logprobs = chat_logprobs(pending) if req.logprobs_k is not None else None
                    pending = []
                    yield sse(chat_chunk(id, req.model, created, {"content": text}, None, logprobs))
                if delta["finish_reason"]:
                    # tokens whose text never showed (leading spaces, a cut stop string) keep their log-probabilities
                    logprobs = chat_logprobs(pending) if req.logprobs_k is not None and pending else None
                    pending = []
                    yield sse(chat_chunk(id, req.model, created, {}, delta["finish_reason"], logprobs))
        except Exception as e:
            yield sse(_server_error(e).body())
        self._finished(req.model, first_token, last)
        if req.include_usage:
            body = usage(last["prompt_tokens"], last["completion_tokens"])
            yield sse(usage_chunk(id, req.model, created, "chat.completion.chunk", body))
        yield sse("[DONE]")
