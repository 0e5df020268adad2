"""Shared parts of the serve benchmark: the model to serve, prompts, a streaming HTTP client, the in-process floor.

The model: configs/demo.yaml's `demo` preset (4 layers, 4 heads, 128 wide, context 128) trained by
raylm's own train stage (1 Ray Train worker, ZeRO 0, fp32) on the cached demo tokens of
train_common.py, exported to benchmarks/results/cache/serve/, and quantized to int8 by raylm's
quantize code (`quantize_gpt` + `save_quantized`, the stage's default tied_embedding="int8"). A second
run finds the trained model finished (the train stage's own fingerprint check) and only re-quantizes.

Prompts: snippets of one to three lines (at most 24 words) of the prepare stage's validation documents,
text the model never trained on, so that every request has its own prompt.

Timing of one completion, on the HTTP endpoint and in process alike:
- TTFT: from the request (for the floor: the start of its batch, tokenization included) to the first
  chunk with non-empty text;
- TPOT: (time of the last chunk with text - time of the first) / (completion tokens - 1);
- completion tokens: the server's `usage` (stream_options.include_usage), in process the engine's count.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import numpy as np

from raylm.serve.app import deployment_name
from train_common import CACHE, DEMO_CONFIG

MODEL = "demo"
"""The served model's name (the OpenAI `model` field)."""
APP = "bench-serve"
"""The Serve application's name (run.name)."""
DEPLOYMENT = deployment_name(MODEL)
"""The model's deployment in the Serve application ("model-demo")."""


# --- the model --------------------------------------------------------------------------------------------


def prepare_models(token_cfg, steps: int, seed: int, threads: int, preset: str = "demo") -> dict:
    """The model preset trained for `steps` steps and exported (cached), and its int8 copy; returns paths and stats.

    `token_cfg`: train_common.demo_tokens()'s config (its train.data holds the token data).
    """
    from raylm.config import load_config
    from raylm.model.artifact import TOKENIZER, load_model, read_model_meta
    from raylm.model.quantized import count_parameters, quantize_gpt, save_quantized
    from raylm.train.trainer import run_train

    root = (CACHE / "serve" / f"{preset}-{steps}steps-seed{seed}").resolve()
    cfg = load_config(DEMO_CONFIG, [
        f"run.workdir={Path(token_cfg.run.workdir).resolve()}", "run.overwrite=true", f"run.seed={seed}",
        "run.name=bench-serve-train", f"train.output={root / 'train'}", "train.tensorboard=false",
        f"train.model.preset={preset}", "train.precision=fp32", f"train.max_steps={steps}", "train.num_workers=1",
        f"train.cpus_per_worker={threads}", f"train.torch_threads={threads}", "train.zero_stage=0",
        f"train.log_interval_steps={max(1, steps // 10)}", f"train.eval_interval_steps={steps}",
        f"train.checkpoint_interval_steps={steps}",
    ])  # fmt: skip
    fp32 = root / "train" / "model"
    found = (fp32 / "config.json").exists()
    started = time.perf_counter()
    # Ray is connected by bench_serve.main; a finished output of this config is found and kept (a changed one retrains)
    summary = run_train(cfg.train, cfg.context())
    train_s = time.perf_counter() - started

    loaded = load_model(fp32)
    int8 = root / "int8"
    qmodel = quantize_gpt(loaded.model, tied_embedding="int8")  # a second of CPU: redone on every run
    save_quantized(int8, qmodel, loaded.path / TOKENIZER, source_meta={**loaded.meta, "source": str(fp32)})
    return {
        "fp32": str(fp32),
        "int8": str(int8),
        "train_steps": steps,
        "train_seconds": round(train_s, 1),
        "found_in_cache": found,
        "num_params": read_model_meta(fp32)["num_params"],
        "int8_num_params": count_parameters(qmodel),
        "block_size": loaded.config.block_size,
        "train_loss": summary.get("loss"),
        "train_val_loss": summary.get("val_loss"),
        "size_bytes": {"fp32": (fp32 / "model.safetensors").stat().st_size,
                       "int8": (int8 / "model.safetensors").stat().st_size},
    }  # fmt: skip


def validation_rows(token_cfg) -> np.ndarray:
    """Every validation row of the token data, (N, seq_len + 1) int64."""
    from raylm.tokenize.shards import read_split_numpy, read_token_meta

    return read_split_numpy(read_token_meta(token_cfg.train.data), "validation")


def perplexity(model, rows: np.ndarray, batch_size: int = 16) -> dict:
    """raylm.evaluate's next-token cross-entropy over `rows`: {val_loss, ppl, val_tokens}."""
    from raylm.evaluate.perplexity import perplexity_metrics, sum_cross_entropy

    return perplexity_metrics(*sum_cross_entropy(model, rows, batch_size))


# --- prompts ----------------------------------------------------------------------------------------------


def corpus_prompts(token_cfg, count: int, max_words: int = 24) -> list[str]:
    """`count` distinct prompts: one to three consecutive lines of the validation documents, round robin over them."""
    import pyarrow.parquet as pq

    files = sorted((Path(token_cfg.prepare.output) / "validation").glob("*.parquet"))
    docs = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    per_doc = [[line.strip() for line in text.splitlines() if len(line.split()) >= 2] for text in docs]
    prompts, seen, k = [], set(), 0
    while len(prompts) < count and k < 50 * count:
        lines = per_doc[k % len(per_doc)]
        offset, span = (k // len(per_doc)) * 7, 1 + k % 3
        if offset + span <= len(lines):
            prompt = " ".join("\n".join(lines[offset : offset + span]).split(" ")[:max_words])
            if prompt not in seen:
                seen.add(prompt)
                prompts.append(prompt)
        k += 1
    if len(prompts) < count:
        raise RuntimeError(f"the validation documents give only {len(prompts)} prompts, {count} wanted")
    return prompts


# --- the HTTP endpoint ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(model_dir: str, workdir: Path, overrides: list[str]):
    """A raylm config serving `model_dir` as MODEL on 127.0.0.1 at a free port, with serve.* `overrides`."""
    from raylm.config import load_config

    return load_config(None, [
        f"run.name={APP}", f"run.workdir={workdir}", "prepare.input=unused", "serve.host=127.0.0.1",
        f"serve.port={free_port()}", f"serve.models={json.dumps({MODEL: str(model_dir)})}", *overrides,
    ])  # fmt: skip


def http_client(connections: int):
    import httpx

    # trust_env=False: a proxy set in the environment must not sit between the client and 127.0.0.1
    return httpx.AsyncClient(
        timeout=httpx.Timeout(300.0), trust_env=False,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )  # fmt: skip


async def stream_completion(client, base_url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed /v1/completions request, greedy; {ttft_s, tpot_s, tokens, text, end_s} or {error}."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first = last = None
    parts, usage = [], None
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    continue  # read on to the end of the response, so that its connection is reused
                event = json.loads(data)
                if "error" in event:
                    return {"error": str(event["error"])[:200]}
                usage = event.get("usage") or usage
                text = "".join(c.get("text") or "" for c in event.get("choices", []))
                if text:
                    last = time.perf_counter()
                    first = first or last
                    parts.append(text)
    except Exception as e:  # a dropped connection counts as an error of this request, not of the benchmark
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    end = time.perf_counter()
    if usage is None:
        return {"error": "no usage chunk before [DONE]"}
    tokens = usage["completion_tokens"]
    return {
        "ttft_s": None if first is None else first - started,
        "tpot_s": (last - first) / (tokens - 1) if first is not None and tokens > 1 else None,
        "tokens": tokens,
        "text": "".join(parts),
        "end_s": end,
    }


async def closed_loop(base_url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    """Every prompt once through `concurrency` clients, each sending its next request when the last one ends.

    Returns the results in prompt order and the wall time of the whole run.
    """
    results: list[dict | None] = [None] * len(prompts)
    todo = iter(range(len(prompts)))

    async def client_loop(client):
        for i in todo:  # one shared iterator: each client takes the next prompt
            results[i] = await stream_completion(client, base_url, prompts[i], max_tokens)

    async with http_client(concurrency) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return results, wall


# --- in process: the floor ----------------------------------------------------------------------------------


def in_process(engine, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    """The prompts in batches of `concurrency` through `engine.stream_batch`, one batch after another.

    Timed as the HTTP requests are: each job's TTFT from the start of its batch (tokenization included).
    """
    from raylm.serve.engine import CompletionJob

    results, started = [], time.perf_counter()
    for b in range(0, len(prompts), concurrency):
        batch = prompts[b : b + concurrency]
        t0 = time.perf_counter()
        jobs = [engine.prepare(CompletionJob(prompt=p, max_tokens=max_tokens, temperature=0)) for p in batch]
        first, last = [None] * len(jobs), [None] * len(jobs)
        tokens, parts = [0] * len(jobs), [[] for _ in jobs]
        for step in engine.stream_batch(jobs):
            now = time.perf_counter()
            for j, delta in enumerate(step):
                if delta is None:
                    continue
                tokens[j] = delta["completion_tokens"]
                if delta["text"]:
                    first[j] = first[j] or now
                    last[j] = now
                    parts[j].append(delta["text"])
        for j in range(len(jobs)):
            results.append({
                "ttft_s": None if first[j] is None else first[j] - t0,
                "tpot_s": (last[j] - first[j]) / (tokens[j] - 1) if first[j] is not None and tokens[j] > 1 else None,
                "tokens": tokens[j], "text": "".join(parts[j]),
            })  # fmt: skip
    return results, time.perf_counter() - started


# --- figures ----------------------------------------------------------------------------------------------


def summarize(results: list[dict], wall_s: float) -> dict:
    """TTFT p50/p99, TPOT p50 (ms), output tokens/s and requests/s over the wall time; failed requests counted."""
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    ms = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else None  # noqa: E731
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_errors": [r["error"] for r in results if "error" in r][:3],
        "wall_s": wall_s,
        "output_tokens": tokens,
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "tpot_p50_ms": ms(tpot, 50),
        "tokens_per_s": tokens / wall_s,
        "requests_per_s": len(ok) / wall_s,
    }


def same_texts(a: list[dict], b: list[dict]) -> int:
    """How many of two runs' completions (same prompts, same order) have the same text."""
    return sum(x.get("text") == y.get("text") and "error" not in x and "error" not in y for x, y in zip(a, b))


def replica_counts() -> dict[str, int]:
    """Replicas of the model deployment by state ("RUNNING", "STARTING", ...), from ray.serve.status()."""
    from ray import serve

    app = serve.status().applications.get(APP)
    deployment = app.deployments.get(DEPLOYMENT) if app else None
    if deployment is None:
        return {}
    return {str(getattr(state, "value", state)): n for state, n in deployment.replica_states.items() if n}
