"""The Ray Serve application: an OpenAI-compatible HTTP ingress in front of one deployment per model.

    HTTP ──▶ OpenAIIngress (FastAPI: auth, validation, SSE) ──handle──▶ model-<name>  (Engine, continuous batching)
                                                            ──handle──▶ model-<other> ...

Each model deployment autoscales on its own (`serve.autoscaling`), reserves
`num_cpus_per_replica` CPUs and decodes concurrent requests together: requests join a
replica's running batch between decoding steps (up to `max_batch_size`) and leave it when
they finish, each streaming one delta per step. Streaming and non-streaming requests take
that same path; the ingress either forwards the deltas as server-sent events or joins them.

    base_url = start_serve(cfg)   # non-blocking; "http://127.0.0.1:8000"
    stop_serve()
    run_serve(cfg)                # `raylm serve`: start, print, block until Ctrl-C, shut down
"""

import asyncio
import errno
import hmac
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm.errors import InputError, RaylmError
from raylm.model.artifact import CONFIG, read_model_meta
from raylm.serve.config import ServeConfig
from raylm.serve.engine import CompletionJob, Engine, PreparedJob, join_deltas
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
    model_card,
    model_not_found,
    new_id,
    parse_request,
    sse,
    usage,
    usage_chunk,
)

logger = logging.getLogger("ray.serve")

GAUGE_REFRESH_S = 5.0
"""How often an idle model replica re-reports its gauges (queue depth, tokens/s)."""


# --- one model ---------------------------------------------------------------------------------------


@serve.deployment
class ModelServer:
    """One exported model behind a deployment handle, decoding its requests by continuous batching.

    The replica runs its own decode loop: requests join the running batch between steps (up to
    max_batch_size rows, prefilled as they join) and leave it when they finish, so a new request
    waits for one decoding step, not for a whole batch to end. When the replica is idle, the first
    request waits batch_wait_timeout_s for others to start with it. Each step runs in a thread,
    so the replica keeps taking requests while it decodes.
    """

    def __init__(self, name: str, model_dir: str, cfg: dict):
        import torch
        from ray.util import metrics

        torch.set_num_threads(max(1, int(cfg["num_cpus_per_replica"])))
        device = "cuda" if cfg["num_gpus_per_replica"] > 0 and torch.cuda.is_available() else "cpu"
        self.name = name
        self.engine = Engine(model_dir, max_tokens_limit=cfg["max_tokens_limit"], device=device)
        self.max_batch_size = cfg["max_batch_size"]
        self.wait_s = cfg["batch_wait_timeout_s"]
        self._pending: deque[tuple[PreparedJob, asyncio.Queue]] = deque()  # arrived, not yet in the batch
        self._outputs: dict[int, asyncio.Queue] = {}  # id(job) -> its caller's queue of deltas
        self._cancelled: list[PreparedJob] = []  # in the batch, their callers gone; dropped before the next step
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.Task | None = None
        tags = {"model": name}

        def tagged(metric):
            metric.set_default_tags(tags)
            return metric

        self._tokens = tagged(metrics.Counter("raylm_generated_tokens", "Tokens generated.", tag_keys=("model",)))
        self._batch_size = tagged(metrics.Histogram(
            "raylm_batch_size", "Requests decoded together, per decoding step.", boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=("model",),
        ))  # fmt: skip
        self._queue = tagged(metrics.Gauge(
            "raylm_queue_depth", "Requests in a replica waiting to join its batch.", tag_keys=("model",)
        ))  # fmt: skip
        self._speed = tagged(metrics.Gauge(
            "raylm_tokens_per_s", "Output tokens per second of the replica's last decoding step.", tag_keys=("model",)
        ))  # fmt: skip

    async def generate(self, job: CompletionJob) -> AsyncIterator[dict]:
        """Deltas of one job; a single {"error": body, "status": code} when the job cannot run."""
        try:
            prepared = self.engine.prepare(job)
        except APIError as e:
            yield {"error": e.body(), "status": e.status}
            return
        if self._loop is None:  # started here: the replica's event loop runs it
            self._wake = asyncio.Event()
            self._loop = asyncio.get_running_loop().create_task(self._decode_loop())
        queue: asyncio.Queue = asyncio.Queue()
        self._pending.append((prepared, queue))
        self._queue.set(len(self._pending))
        self._wake.set()
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                # Deltas that piled up while the caller was busy go as one: fewer messages through Serve when
                # the machine is loaded, and never a wait for a token that is not there yet.
                while not isinstance(delta, BaseException) and delta["finish_reason"] is None and not queue.empty():
                    more = queue.get_nowait()
                    if isinstance(more, BaseException):
                        yield delta
                        delta = more
                        break
                    delta = join_deltas(delta, more)
                if isinstance(delta, BaseException):
                    raise delta
                finished = delta["finish_reason"] is not None
                yield delta
        finally:
            if not finished:  # the caller went away: forget the job, or drop it from the batch before the next step
                waiting = next((i for i, (job, _) in enumerate(self._pending) if job is prepared), None)
                if waiting is not None:
                    del self._pending[waiting]
                else:
                    self._cancelled.append(prepared)

    async def _decode_loop(self) -> None:
        batch = self.engine.batch()
        while True:
            if not batch and not self._pending:
                self._wake.clear()
                self._speed.set(0.0)
                while not self._wake.is_set():
                    # Ray drops a gauge no one has set for ~30 s: an idle replica keeps reporting its zeros.
                    self._queue.set(0)
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=GAUGE_REFRESH_S)
                    except asyncio.TimeoutError:
                        self._speed.set(0.0)
                if self.wait_s > 0:
                    await asyncio.sleep(self.wait_s)  # let a burst of requests start together
            gone, self._cancelled = self._cancelled, []
            if gone:
                batch.drop(gone)
                for job in gone:
                    self._outputs.pop(id(job), None)
            joining = []
            while self._pending and len(batch) + len(joining) < self.max_batch_size:
                job, queue = self._pending.popleft()
                self._outputs[id(job)] = queue
                joining.append(job)
            self._queue.set(len(self._pending))
            if not batch and not joining:
                continue
            started = time.perf_counter()
            try:
                deltas = await asyncio.to_thread(self._step, batch, joining)
            except Exception as e:  # the model failed: every caller in the batch gets the error
                logger.exception("raylm serve: decoding step failed")
                for queue in self._outputs.values():
                    queue.put_nowait(e)
                self._outputs.clear()
                batch = self.engine.batch()
                continue
            for job, delta in deltas:
                queue = self._outputs.get(id(job))
                if delta["finish_reason"] is not None:
                    self._outputs.pop(id(job), None)
                if queue is not None:
                    queue.put_nowait(delta)
            if batch.last_step_tokens:
                self._tokens.inc(batch.last_step_tokens)
                self._speed.set(batch.last_step_tokens / max(time.perf_counter() - started, 1e-9))

    def _step(self, batch, joining: list[PreparedJob]) -> list:
        if joining:
            batch.add(joining)
        self._batch_size.observe(len(batch))
        return batch.step()

    async def info(self) -> dict:
        return {"name": self.name, **self.engine.info()}


# --- the HTTP ingress ---------------------------------------------------------------------------------

api = FastAPI(title="raylm", description="OpenAI-compatible completions from raylm models.")

_MS_BOUNDARIES = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class IngressMetrics:
    """The ingress's Ray metrics (exported to the Ray dashboard's Prometheus endpoint as ray_raylm_*)."""

    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter(
            "raylm_requests", "HTTP requests answered, by route, model and status code.",
            tag_keys=("route", "model", "status"),
        )  # fmt: skip
        self.errors = metrics.Counter(
            "raylm_request_errors", "Requests answered with an error (4xx or 5xx), by route, status and error code.",
            tag_keys=("route", "status", "code"),
        )  # fmt: skip
        self.ttft = metrics.Histogram(
            "raylm_time_to_first_token_ms", "From a request's arrival to its first generated token.",
            boundaries=_MS_BOUNDARIES, tag_keys=("model",),
        )  # fmt: skip
        self.tpot = metrics.Histogram(
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


async def _deltas(first: dict, stream) -> AsyncIterator[dict]:
    """The delta already read, then the rest of the stream.

    Defined above the deployments: Serve captures a deployment class, and the module globals
    it uses, when the decorator runs.
    """
    yield first
    async for delta in stream:
        yield delta


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    """OpenAI routes: /v1/completions, /v1/chat/completions, /v1/models, /health."""

    def __init__(self, models: dict[str, DeploymentHandle], cards: dict[str, dict], cfg: dict, app_name: str):
        self.handles = models
        self.models = {name: handle.options(stream=True) for name, handle in models.items()}
        self.cards = cards
        self.api_key = cfg["api_key"]
        self.max_tokens_limit = cfg["max_tokens_limit"]
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
        jobs = [
            CompletionJob(
                prompt=prompt,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=None if req.seed is None else req.seed + j,
                stop=tuple(req.stops),
                echo=req.echo,
                logprobs=req.logprobs,
            )
            for prompt in req.prompts
            for j in range(req.n)
        ]
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
        prompt = chat_prompt(req.messages)
        jobs = [
            CompletionJob(
                prompt=prompt,
                max_tokens=req.token_budget,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=None if req.seed is None else req.seed + j,
                stop=(*req.stops, CHAT_STOP),
                param="messages",
                logprobs=req.logprobs_k,
            )
            for j in range(req.n)
        ]
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


# --- building and running -----------------------------------------------------------------------------


def deployment_name(model: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model)


def available_models(serve_cfg: ServeConfig) -> dict[str, str]:
    """The configured models whose directories hold an exported model; the others are reported and skipped.

    The default model list names every model a full run exports (trained, student, int8);
    serving after a partial run serves what exists. None existing is an InputError.
    """
    found, missing = {}, []
    for name, path in serve_cfg.models.items():
        if (Path(path) / CONFIG).exists():
            read_model_meta(path)  # a malformed config.json fails here, naming the file
            found[name] = str(path)
        else:
            missing.append(f"{name} ({path})")
    if not found:
        raise InputError(f"serve.models: no exported model found: {', '.join(missing)}")
    if missing:
        print(f"raylm serve: skipping models that do not exist: {', '.join(missing)}", file=sys.stderr)
    return found


def build_app(serve_cfg: ServeConfig, name: str = "raylm") -> serve.Application:
    """The Serve application for `serve_cfg`: the ingress bound to one autoscaled deployment per model."""
    from raylm.serve.deploy import deployment_options

    cfg = serve_cfg.model_dump()
    handles, cards = {}, {}
    for model, path in available_models(serve_cfg).items():
        handles[model] = ModelServer.options(name=deployment_name(model), **deployment_options(serve_cfg)).bind(model, path, cfg)
        cards[model] = model_card(model, int((Path(path) / CONFIG).stat().st_mtime))
    return OpenAIIngress.options(
        name="openai",
        num_replicas=serve_cfg.ingress_replicas,
        # The ingress only parses, routes and streams: asynchronous and light, so it takes no CPU slot.
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    ).bind(handles, cards, cfg, name)


def _url(serve_cfg: ServeConfig) -> str:
    host = serve_cfg.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{serve_cfg.port}"


def start_serve(cfg) -> str:
    """Start Serve (HTTP on serve.host:serve.port) with the app named cfg.run.name; return its base URL.

    Returns once every model deployment is running. If Serve already runs on this cluster
    its HTTP settings stay as they are (Ray Serve's rule).
    """
    return _start(cfg)[0]


def _start(cfg) -> tuple[str, list[str]]:
    import ray

    from raylm.runtime import init_ray

    if not ray.is_initialized():
        init_ray(cfg.ray.address, cfg.ray.num_cpus)
    models = available_models(cfg.serve)
    app = build_app(cfg.serve.model_copy(update={"models": models}), cfg.run.name)
    if not serve.status().proxies:  # Serve not running yet: our HTTP options will apply
        _check_port_free(cfg.serve.host, cfg.serve.port)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=cfg.run.name, route_prefix="/")
    return _url(cfg.serve), sorted(models)


def _check_port_free(host: str, port: int) -> None:
    """Fail early on a port in use: Serve's proxy would otherwise retry the bind forever."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RaylmError(f"serve.port: {host}:{port} is already in use; choose another with --serve.port=N")
            # Another errno (an address of another node, say): the proxy will report it itself.


def stop_serve() -> None:
    """Shut Serve down on the cluster: every application, replica and proxy."""
    serve.shutdown()


def run_serve(cfg) -> dict:
    """`raylm serve`: start serving, print the URL and the models, block until Ctrl-C, shut down."""
    base_url, models = _start(cfg)
    auth = " (Authorization: Bearer <serve.api_key>)" if cfg.serve.api_key else ""
    print(f"raylm serve: {', '.join(models)} at {base_url}/v1{auth}; Ctrl-C to stop", flush=True)
    # `ray job stop` and process managers send SIGTERM: shut down as on Ctrl-C.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_serve()
        if main:
            signal.signal(signal.SIGTERM, previous)
    return {"output": base_url, "models": models}


def _interrupt(signum, frame):
    raise KeyboardInterrupt
