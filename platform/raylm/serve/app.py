"""The Ray Serve application: an OpenAI-compatible HTTP ingress in front of one deployment per model.

    HTTP ──▶ OpenAIIngress (FastAPI: auth, validation, SSE) ──handle──▶ model-<name>  (Engine, @serve.batch)
                                                            ──handle──▶ model-<other> ...

Each model deployment autoscales on its own (`serve.autoscaling`), reserves
`num_cpus_per_replica` CPUs and decodes concurrent requests together: `@serve.batch` gathers
up to `max_batch_size` requests and streams them through one batched decode, one list
per step. Streaming and non-streaming requests take that same path; the ingress either
forwards the deltas as server-sent events or joins them.

    base_url = start_serve(cfg)   # non-blocking; "http://127.0.0.1:8000"
    stop_serve()
    run_serve(cfg)                # `raylm serve`: start, print, block until Ctrl-C, shut down
"""

import asyncio
import errno
import hmac
import logging
import math
import re
import signal
import socket
import sys
import threading
import time
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
from raylm.serve.engine import CompletionJob, Engine
from raylm.serve.openai_api import (
    CHAT_STOP,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    chat_prompt,
    completion_body,
    completion_chunk,
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


# --- one model ---------------------------------------------------------------------------------------


@serve.deployment
class ModelServer:
    """One exported model behind a deployment handle; streams deltas of batched generation."""

    def __init__(self, name: str, model_dir: str, cfg: dict):
        import torch
        from ray.util import metrics

        torch.set_num_threads(max(1, int(cfg["num_cpus_per_replica"])))
        device = "cuda" if cfg["num_gpus_per_replica"] > 0 and torch.cuda.is_available() else "cpu"
        self.name = name
        self.engine = Engine(model_dir, max_tokens_limit=cfg["max_tokens_limit"], device=device)
        self._batched.set_max_batch_size(cfg["max_batch_size"])
        self._batched.set_batch_wait_timeout_s(cfg["batch_wait_timeout_s"])
        tags = {"model": name}
        self._tokens = metrics.Counter("raylm_generated_tokens", "Tokens generated.", tag_keys=("model",))
        self._tokens.set_default_tags(tags)
        self._batch_size = metrics.Histogram(
            "raylm_batch_size", "Requests decoded together.", boundaries=[1, 2, 4, 8, 16, 32], tag_keys=("model",)
        )
        self._batch_size.set_default_tags(tags)

    async def generate(self, job: CompletionJob) -> AsyncIterator[dict]:
        """Deltas of one job; a single {"error": body, "status": code} when the job cannot run."""
        try:
            prepared = self.engine.prepare(job)
        except APIError as e:
            yield {"error": e.body(), "status": e.status}
            return
        async for delta in self._batched(prepared):
            yield delta

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list) -> AsyncIterator[list]:
        # Called with the jobs of concurrent requests; yields one list per decoding step,
        # StopIteration for a job that has finished (Serve then ends that caller's stream).
        self._batch_size.observe(len(jobs))
        steps = self.engine.stream_batch(jobs)
        while True:
            # Each step runs in a thread so the replica keeps accepting requests for the next batch.
            out = await asyncio.to_thread(next, steps, None)
            if out is None:
                return
            finished = sum(d["completion_tokens"] for d in out if d is not None and d["finish_reason"] is not None)
            if finished:
                self._tokens.inc(finished)
            yield [StopIteration if d is None else d for d in out]

    async def info(self) -> dict:
        return {"name": self.name, **self.engine.info()}


# --- the HTTP ingress ---------------------------------------------------------------------------------

api = FastAPI(title="raylm", description="OpenAI-compatible completions from raylm models.")


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
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
        self.models = {name: handle.options(stream=True) for name, handle in models.items()}
        self.cards = cards
        self.api_key = cfg["api_key"]
        self.max_tokens_limit = cfg["max_tokens_limit"]
        self.app_name = app_name

    # -- helpers --

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise invalid_api_key()

    def _model(self, name: str) -> DeploymentHandle:
        if name not in self.models:
            raise model_not_found(name)
        return self.models[name]

    def _check_max_tokens(self, max_tokens: int | None, param: str = "max_tokens") -> None:
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise APIError(
                f"max_tokens is {max_tokens}; this server allows at most {self.max_tokens_limit}",
                param=param,
                code="invalid_value",
            )

    @staticmethod
    async def _open(handle: DeploymentHandle, job: CompletionJob) -> tuple[dict, AsyncIterator[dict]]:
        """Start a job and read its first delta, so that a bad job becomes an HTTP error before any stream."""
        stream = handle.generate.remote(job)
        try:
            first = await stream.__anext__()
        except Exception as e:  # a replica crash, not a bad request
            raise _server_error(e) from None
        if "error" in first:
            raise APIError.from_body(first["error"], first["status"])
        return first, stream

    async def _collect(self, handle: DeploymentHandle, job: CompletionJob) -> dict:
        first, stream = await self._open(handle, job)
        parts, last = [first["text"]], first
        try:
            async for delta in stream:
                parts.append(delta["text"])
                last = delta
        except Exception as e:
            raise _server_error(e) from None
        return {**last, "text": "".join(parts)}

    async def _gather(self, handle: DeploymentHandle, jobs: list[CompletionJob]) -> list[dict]:
        # Sent together, so one replica's @serve.batch can decode them in one batch.
        return list(await asyncio.gather(*(self._collect(handle, job) for job in jobs)))

    @staticmethod
    def _usage(results: list[dict], n: int) -> dict:
        prompt_tokens = sum(r["prompt_tokens"] for r in results[::n])  # each prompt counts once, not per choice
        return usage(prompt_tokens, sum(r["completion_tokens"] for r in results))

    # -- routes --

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "app": self.app_name, "models": sorted(self.models)}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [self.cards[name] for name in sorted(self.cards)]}

    @api.get("/v1/models/{model}")
    async def get_model(self, model: str, request: Request) -> dict:
        self._authorize(request)
        self._model(model)
        return self.cards[model]

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        req = parse_request(await request.body(), CompletionRequest)
        handle = self._model(req.model)
        self._check_max_tokens(req.max_tokens)
        jobs = [
            CompletionJob(
                prompt=prompt,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=None if req.seed is None else req.seed + j,
                stop=tuple(req.stops),
                echo=req.echo,
            )
            for prompt in req.prompts
            for j in range(req.n)
        ]
        if req.stream:
            first, stream = await self._open(handle, jobs[0])
            events = self._completion_events(req, first, stream)
            return StreamingResponse(events, media_type="text/event-stream")
        results = await self._gather(handle, jobs)
        return completion_body(new_id("cmpl"), req.model, results, self._usage(results, req.n))

    async def _completion_events(self, req: CompletionRequest, first: dict, stream) -> AsyncIterator[str]:
        id, created, last = new_id("cmpl"), int(time.time()), first
        try:
            async for delta in _deltas(first, stream):
                last = delta
                if delta["text"] or delta["finish_reason"]:
                    yield sse(completion_chunk(id, req.model, created, delta["text"], delta["finish_reason"]))
        except Exception as e:
            yield sse(_server_error(e).body())
        if req.include_usage:
            body = usage(last["prompt_tokens"], last["completion_tokens"])
            yield sse(usage_chunk(id, req.model, created, "text_completion", body))
        yield sse("[DONE]")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        req = parse_request(await request.body(), ChatCompletionRequest)
        handle = self._model(req.model)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        self._check_max_tokens(req.token_budget, param)
        prompt = chat_prompt(req.messages)
        jobs = [
            CompletionJob(
                prompt=prompt,
                max_tokens=req.token_budget,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=None if req.seed is None else req.seed + j,
                stop=(*req.stops, CHAT_STOP),
                param="messages",
            )
            for j in range(req.n)
        ]
        if req.stream:
            first, stream = await self._open(handle, jobs[0])
            return StreamingResponse(self._chat_events(req, first, stream), media_type="text/event-stream")
        results = await self._gather(handle, jobs)
        for r in results:
            r["text"] = r["text"].strip()  # the transcript puts a space after "Assistant:"
        return chat_body(new_id("chatcmpl"), req.model, results, self._usage(results, req.n))

    async def _chat_events(self, req: ChatCompletionRequest, first: dict, stream) -> AsyncIterator[str]:
        id, created, last = new_id("chatcmpl"), int(time.time()), first
        yield sse(chat_chunk(id, req.model, created, {"role": "assistant", "content": ""}, None))
        started = False  # the first words of the reply lose their leading space
        try:
            async for delta in _deltas(first, stream):
                last = delta
                text = delta["text"] if started else delta["text"].lstrip()
                started = started or bool(text)
                if text:
                    yield sse(chat_chunk(id, req.model, created, {"content": text}, None))
                if delta["finish_reason"]:
                    yield sse(chat_chunk(id, req.model, created, {}, delta["finish_reason"]))
        except Exception as e:
            yield sse(_server_error(e).body())
        if req.include_usage:
            body = usage(last["prompt_tokens"], last["completion_tokens"])
            yield sse(usage_chunk(id, req.model, created, "chat.completion.chunk", body))
        yield sse("[DONE]")


# --- building and running -----------------------------------------------------------------------------


def _deployment_name(model: str) -> str:
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
    cfg = serve_cfg.model_dump()
    auto = serve_cfg.autoscaling
    actor_options = {"num_cpus": serve_cfg.num_cpus_per_replica}
    if serve_cfg.num_gpus_per_replica > 0:
        actor_options["num_gpus"] = serve_cfg.num_gpus_per_replica
    handles, cards = {}, {}
    for model, path in available_models(serve_cfg).items():
        handles[model] = ModelServer.options(
            name=_deployment_name(model),
            ray_actor_options=actor_options,
            autoscaling_config=auto.model_dump(),
            # Room for a full batch being decoded and the next one gathering.
            max_ongoing_requests=max(2 * serve_cfg.max_batch_size, math.ceil(auto.target_ongoing_requests)),
        ).bind(model, path, cfg)
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
