"""A model replica: one exported model behind a Serve deployment, decoding its requests by continuous batching.

    OpenAIIngress ──generate.remote(job)──▶ ModelServer  ──▶ a stream of deltas (see raylm.serve.engine)

The replica reports its own Ray metrics (exported as ray_raylm_*): tokens generated, batch size per
decoding step, queue depth and tokens/s, all tagged with the model's name.
"""

import asyncio
import logging
import time
from collections import deque
from typing import AsyncIterator

import torch
from ray import serve
from ray.util.metrics import Counter, Gauge, Histogram

from raylm.serve.config import ServeConfig
from raylm.serve.engine import CompletionJob, Engine, EngineBatch, PreparedJob, join_deltas
from raylm.serve.openai_api import APIError

logger = logging.getLogger("ray.serve")

GAUGE_REFRESH_S = 5.0
"""How often an idle model replica re-reports its gauges (queue depth, tokens/s)."""


@serve.deployment
class ModelServer:
    """One exported model behind a deployment handle, decoding its requests by continuous batching.

    The replica runs its own decode loop: requests join the running batch between steps (up to
    max_batch_size rows, prefilled as they join) and leave it when they finish, so a new request
    waits for one decoding step, not for a whole batch to end. When the replica is idle, the first
    request waits batch_wait_timeout_s for others to start with it. Each step runs in a thread,
    so the replica keeps taking requests while it decodes.
    """

    def __init__(self, name: str, model_dir: str, serve_cfg: ServeConfig):
        torch.set_num_threads(max(1, int(serve_cfg.num_cpus_per_replica)))
        device = "cuda" if serve_cfg.num_gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        self.name = name
        self.engine = Engine(model_dir, max_tokens_limit=serve_cfg.max_tokens_limit, device=device)
        self.max_batch_size = serve_cfg.max_batch_size
        self.wait_s = serve_cfg.batch_wait_timeout_s
        self._pending: deque[tuple[PreparedJob, asyncio.Queue]] = deque()  # arrived, not yet in the batch
        self._outputs: dict[int, asyncio.Queue] = {}  # id(job) -> its caller's queue of deltas
        self._cancelled: list[PreparedJob] = []  # in the batch, their callers gone; dropped before the next step
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.Task | None = None
        tags = {"model": name}

        def tagged(metric):
            metric.set_default_tags(tags)
            return metric

        self._tokens = tagged(Counter("raylm_generated_tokens", "Tokens generated.", tag_keys=("model",)))
        self._batch_size = tagged(Histogram(
            "raylm_batch_size", "Requests decoded together, per decoding step.", boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=("model",),
        ))  # fmt: skip
        self._queue = tagged(Gauge(
            "raylm_queue_depth", "Requests in a replica waiting to join its batch.", tag_keys=("model",)
        ))  # fmt: skip
        self._speed = tagged(Gauge(
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

    def _step(self, batch: EngineBatch, joining: list[PreparedJob]) -> list[tuple[PreparedJob, dict]]:
        if joining:
            batch.add(joining)
        self._batch_size.observe(len(batch))
        return batch.step()

    async def info(self) -> dict:
        return {"name": self.name, **self.engine.info()}
