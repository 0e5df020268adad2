"""`raylm demo`: every stage in order on one local Ray, then a completion fetched over HTTP."""

from __future__ import annotations

import json
import time
import urllib.request

import ray
from rich.console import Console

from raylm import storage
from raylm.config import RaylmConfig
from raylm.serve.lifecycle import start_serve, stop_serve
from raylm.stages import STAGES, connect, run_stage

PIPELINE = tuple(name for name in STAGES if name != "serve")
"""The stages the demo runs in order before it serves the models (raylm.stages.STAGES)."""
DEMO_PROMPT = "ROMEO. "


def fetch_completion(base_url: str, model: str, prompt: str, max_tokens: int = 32, api_key: str | None = None) -> dict:
    """POST /v1/completions and return the parsed JSON response."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": 0})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(f"{base_url}/v1/completions", data=body.encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def run_demo(cfg: RaylmConfig, address: str | None = None, keep_serving: bool = False) -> int:
    """Run prepare → tokenize → train → tune → distill → quantize → evaluate → serve, print the results."""
    console = Console()
    started = time.time()
    ctx = cfg.context(address)
    connect(ctx)
    outputs: dict[str, str] = {}
    for stage in PIPELINE:
        console.rule(f"[bold]raylm {stage}")
        t0 = time.time()
        summary = run_stage(stage, cfg, ctx)
        outputs[stage] = str(summary.get("output", ""))
        console.print(f"[green]{stage}[/] done in {time.time() - t0:.1f}s -> {outputs[stage]}")

    console.rule("[bold]raylm serve")
    base_url = start_serve(cfg.serve, ctx)
    model = ctx.name
    completion = fetch_completion(base_url, model, DEMO_PROMPT, api_key=cfg.serve.api_key)

    if not keep_serving:
        stop_serve()
        ray.shutdown()  # no late worker logs after the results below

    console.rule("[bold]raylm demo: results")
    for stage, out in outputs.items():
        print(f"  {stage:<9} {out}")
    table = storage.join(outputs["evaluate"], "table.txt")
    if storage.is_file(table):
        print(storage.read_text(table).rstrip())  # plain print: rich would re-wrap the fixed-width table
    text = completion["choices"][0]["text"]
    print(f"POST {base_url}/v1/completions model={model} prompt={DEMO_PROMPT!r}")
    print(f"completion: {DEMO_PROMPT + text!r}")
    print(f"demo finished in {time.time() - started:.0f}s", flush=True)
    if keep_serving:
        print(f"serving {sorted(cfg.serve.models)} at {base_url}/v1 (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        stop_serve()
    return 0
