"""Serve stage: latency and throughput of the OpenAI endpoint against in-process generation, batching, int8, autoscaling.

    python benchmarks/bench_serve.py                       # every section: ~8 min on 2 quiet cores, 3.5 of them
                                                           # training the model (cached for the next run)
    python benchmarks/bench_serve.py --quick               # a smoke run of every section (~4 min, ~3 once cached)
    python benchmarks/bench_serve.py --sections latency,batching --concurrency 1,4,16

The model (serve_common.py): the --preset preset (`demo`: ~1.3M parameters; `10m`: ~12M; context 128)
trained by raylm's train stage for --train-steps steps on the bundled corpus (configs/demo.yaml's tokens, cached in
benchmarks/results/cache/), exported, and quantized to int8 by raylm's quantize code. Requests: greedy
(temperature 0), --max-tokens tokens each, prompts of 1-3 lines of the validation documents, streamed
from /v1/completions on a local Ray Serve (127.0.0.1, a free port) and read as server-sent events; the
completion tokens come from the server's usage chunk (stream_options.include_usage). At concurrency c,
c clients each send their next request when their last one ends (closed loop), --waves x c requests
in all (at least --min-requests). TTFT: request to the first chunk with text; TPOT: (last chunk with
text - first) / (tokens - 1); tokens/s and requests/s: over the wall time of all the requests.

1. latency: concurrency --concurrency (1, 8, 32) against one replica (num_cpus_per_replica
   --replica-cpus, by default the machine's cores, so torch uses them all; max_batch_size --max-batch-size, autoscaling min = max = 1).
   The floor: the same prompts decoded in this process by raylm's Engine.stream_batch, in batches of c
   (batch k + 1 starts when batch k ends), same torch threads, timed the same way. Served and
   in-process greedy texts are compared too (same prompts: the same text expected).
2. batching: output tokens/s at concurrency --batching-concurrency (16) with the replica's continuous
   batching decoding up to 16 requests together against max_batch_size 1 (one request decoded at a time), one replica each, Serve
   restarted between the two; and the same gain in process (batch 16 vs batch 1) for reference.
   Target: >= 3x.
3. quantized: in-process tokens/s at concurrency 1 and 8 of the fp32 model and its int8 copy
   (interleaved for --rounds rounds, median), and both models' validation perplexity on every row
   of the validation split of the token data (raylm.evaluate.perplexity), with ratios and differences.
4. autoscale: one deployment with min 1, max 2 replicas of 1 CPU each, target_ongoing_requests 2,
   upscale_delay_s 1, downscale_delay_s 5; --autoscale-clients clients stream requests in a loop while
   ray.serve.status() is polled: seconds from the start of the load until a second replica is
   RUNNING (and until the autoscaler first asked for it, STARTING), tokens/s before and after, then the
   load stops and the seconds until one replica is RUNNING again. Every wait is bounded
   (--upscale-timeout-s, --downscale-timeout-s).

Results: benchmarks/results/serve.json (serve_<preset>.json with --preset; rewritten after each section).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed (the train stage does)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Serve's replicas and proxy log every request; keep those lines in Ray's log files (/tmp/ray/session_*/logs/serve),
# out of the benchmark's output. The local Ray starts from this process, so its workers inherit this.
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")

from serve_common import (  # noqa: E402
    DEPLOYMENT, closed_loop, corpus_prompts, http_client, in_process, perplexity, prepare_models, replica_counts,
    same_texts, serve_config, stream_completion, summarize, validation_rows,
)  # fmt: skip
from train_common import CACHE, RESULTS, demo_tokens  # noqa: E402

CORES = os.cpu_count() or 1
SECTIONS = ("latency", "batching", "quantized", "autoscale")


@contextlib.contextmanager
def served(model_dir: str, overrides: list[str]):
    """Serve `model_dir` with these serve.* overrides; yields (base_url, seconds start_serve took); stops Serve after."""
    from raylm.serve.lifecycle import start_serve, stop_serve

    cfg = serve_config(model_dir, CACHE / "serve", ["serve.max_tokens_limit=128", *overrides])
    started = time.perf_counter()
    base_url = start_serve(cfg.serve, cfg.context())
    try:
        yield base_url, time.perf_counter() - started
    finally:
        stop_serve()


def results_name(args) -> str:
    return "serve.json" if args.preset == "demo" else f"serve_{args.preset}.json"


def one_replica(cpus: float, max_batch_size: int) -> list[str]:
    return [f"serve.num_cpus_per_replica={cpus}", f"serve.max_batch_size={max_batch_size}",
            "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1"]  # fmt: skip


def request_count(args, concurrency: int) -> int:
    return max(args.min_requests, args.waves * concurrency)


def warm_up(base_url: str, prompts: list[str], concurrency: int, max_tokens: int) -> None:
    """One wave of requests that are not timed: connections opened, the replica's first batches run."""
    asyncio.run(closed_loop(base_url, prompts[-concurrency:], concurrency, max_tokens))


def fmt(x, spec: str = ",.1f") -> str:
    return "n/a" if x is None else format(x, spec)


# --- sections ---------------------------------------------------------------------------------------------


def latency(ctx: dict, args, results: dict) -> None:
    from raylm.serve.engine import Engine

    fp32, prompts, mt = ctx["models"]["fp32"], ctx["prompts"], args.max_tokens
    engine = Engine(fp32, max_tokens_limit=128)
    in_process(engine, prompts[-8:], 8, mt)  # warm-up
    floor, runs = {}, {}
    for c in args.concurrency:
        runs[c] = in_process(engine, prompts[: request_count(args, c)], c, mt)
        floor[c] = summarize(*runs[c])
    rows = []
    with served(fp32, one_replica(args.replica_cpus, args.max_batch_size)) as (base_url, start_s):
        for c in args.concurrency:
            warm_up(base_url, prompts, c, mt)
            http, wall = asyncio.run(closed_loop(base_url, prompts[: request_count(args, c)], c, mt))
            s = summarize(http, wall)
            rows.append({"concurrency": c, "served": s, "in_process": floor[c],
                         "ratio_tokens_per_s": s["tokens_per_s"] / floor[c]["tokens_per_s"],
                         "same_text": same_texts(http, runs[c][0])})  # fmt: skip
    results["latency"] = {"serve_start_s": start_s, "max_batch_size": args.max_batch_size, "replica_cpus": args.replica_cpus,
                          "max_tokens": mt, "rows": rows}  # fmt: skip
    print(f"\n== latency and throughput: streamed /v1/completions, 1 replica ({args.replica_cpus:g} CPUs, max_batch_size "
          f"{args.max_batch_size}), greedy, {mt} tokens, closed loop; floor: Engine.stream_batch in process, "
          f"batches of c ==")  # fmt: skip
    print(f"{'conc':>4} {'reqs':>5} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'out tok/s':>10} {'req/s':>7} | "
          f"{'in-proc TTFT':>12} {'TPOT':>6} {'tok/s':>8} | {'served/in-proc':>14} {'same text':>9}")  # fmt: skip
    for r in rows:
        s, f = r["served"], r["in_process"]
        print(f"{r['concurrency']:>4} {s['requests']:>5} {fmt(s['ttft_p50_ms']):>9} {fmt(s['ttft_p99_ms']):>9} "
              f"{fmt(s['tpot_p50_ms'], '.2f'):>9} {s['tokens_per_s']:>10,.0f} {s['requests_per_s']:>7.2f} | "
              f"{fmt(f['ttft_p50_ms']):>12} {fmt(f['tpot_p50_ms'], '.2f'):>6} {f['tokens_per_s']:>8,.0f} | "
              f"{r['ratio_tokens_per_s']:>14.2f} {r['same_text']:>4}/{s['requests']:<4}")  # fmt: skip
        if s["errors"]:
            print(f"     {s['errors']} failed requests, e.g. {s['first_errors'][0]}")
    print(f"times in ms; served/in-proc: output tokens/s ratio; Serve start (replica loaded): {start_s:.1f} s")


def batching(ctx: dict, args, results: dict) -> None:
    from raylm.serve.engine import Engine

    fp32, prompts, mt, c = ctx["models"]["fp32"], ctx["prompts"], args.max_tokens, args.batching_concurrency
    todo = prompts[: request_count(args, c)]
    served_runs = {}
    for max_batch in (c, 1):
        with served(fp32, one_replica(args.replica_cpus, max_batch)) as (base_url, _):
            warm_up(base_url, prompts, c, mt)
            served_runs[max_batch] = summarize(*asyncio.run(closed_loop(base_url, todo, c, mt)))
    engine = Engine(fp32, max_tokens_limit=128)
    local = {b: summarize(*in_process(engine, todo, b, mt)) for b in (c, 1)}
    on, off = served_runs[c], served_runs[1]
    results["batching"] = {
        "concurrency": c, "requests": len(todo), "max_tokens": mt, "served": {"on": on, "off": off},
        "ratio": on["tokens_per_s"] / off["tokens_per_s"],
        "in_process": {"batch": local[c], "one_at_a_time": local[1],
                       "ratio": local[c]["tokens_per_s"] / local[1]["tokens_per_s"]},
    }  # fmt: skip
    r = results["batching"]
    print(f"\n== batching: concurrency {c}, {len(todo)} requests of {mt} tokens, 1 replica ({args.replica_cpus:g} CPUs) ==")
    print(f"{'':>28} {'out tok/s':>10} {'req/s':>7} {'TTFT p50':>9} {'TPOT p50':>9}")
    for name, s in ((f"served, max_batch_size {c}", on), ("served, max_batch_size 1", off),
                    (f"in process, batches of {c}", local[c]), ("in process, one at a time", local[1])):  # fmt: skip
        print(f"{name:>28} {s['tokens_per_s']:>10,.0f} {s['requests_per_s']:>7.2f} {fmt(s['ttft_p50_ms']):>9} "
              f"{fmt(s['tpot_p50_ms'], '.2f'):>9}")  # fmt: skip
    print(f"batching gain served: {r['ratio']:.2f}x (target >= 3x); in process: {r['in_process']['ratio']:.2f}x")


def quantized(ctx: dict, args, results: dict) -> None:
    from raylm.serve.engine import Engine

    models, prompts, mt = ctx["models"], ctx["prompts"], args.max_tokens
    engines = {name: Engine(models[name], max_tokens_limit=128) for name in ("fp32", "int8")}
    rows = validation_rows(ctx["token_cfg"])
    ppl = {name: perplexity(e.model, rows) for name, e in engines.items()}
    levels = (1, 8)
    for e in engines.values():
        in_process(e, prompts[-8:], 8, mt)  # warm-up
    tps: dict = {(name, c): [] for name in engines for c in levels}
    texts: dict = {}
    for _ in range(args.rounds):  # interleaved: this VM's speed drifts over minutes
        for c in levels:
            for name, e in engines.items():
                out, wall = in_process(e, prompts[: request_count(args, c)], c, mt)
                tps[(name, c)].append(summarize(out, wall)["tokens_per_s"])
                texts[(name, c)] = out
    speed = {name: {c: statistics.median(tps[(name, c)]) for c in levels} for name in engines}
    agree = same_texts(texts[("fp32", 8)], texts[("int8", 8)])
    results["quantized"] = {
        "where": "in process (Engine.stream_batch)", "max_tokens": mt, "rounds": args.rounds,
        "tokens_per_s": speed, "rounds_tokens_per_s": {f"{n}-c{c}": v for (n, c), v in tps.items()},
        "perplexity": ppl, "size_bytes": models["size_bytes"],
        "params": {"fp32": models["num_params"], "int8": models["int8_num_params"]},
        "speed_ratio_int8_over_fp32": {c: speed["int8"][c] / speed["fp32"][c] for c in levels},
        "ppl_ratio_int8_over_fp32": ppl["int8"]["ppl"] / ppl["fp32"]["ppl"],
        "val_loss_diff": ppl["int8"]["val_loss"] - ppl["fp32"]["val_loss"],
        "same_greedy_text_c8": f"{agree}/{len(texts[('fp32', 8)])}",
    }  # fmt: skip
    q = results["quantized"]
    print(f"\n== int8 vs fp32 on this CPU: in process (Engine.stream_batch, {CORES} torch threads), greedy, {mt} tokens, "
          f"median of {args.rounds} interleaved rounds; perplexity on {ppl['fp32']['val_tokens']:,} validation tokens ==")  # fmt: skip
    print(f"{'model':>6} {'params':>10} {'size MB':>8} {'val loss':>9} {'ppl':>8} {'tok/s c=1':>10} {'tok/s c=8':>10}")
    for name in engines:
        p = ppl[name]
        print(f"{name:>6} {q['params'][name]:>10,} {q['size_bytes'][name] / 1e6:>8.2f} {p['val_loss']:>9.4f} {p['ppl']:>8.2f} "
              f"{speed[name][1]:>10,.0f} {speed[name][8]:>10,.0f}")  # fmt: skip
    print(f"int8/fp32: speed {q['speed_ratio_int8_over_fp32'][1]:.2f}x at c=1, {q['speed_ratio_int8_over_fp32'][8]:.2f}x "
          f"at c=8; perplexity x{q['ppl_ratio_int8_over_fp32']:.4f} (val loss {q['val_loss_diff']:+.4f} nats); "
          f"size x{q['size_bytes']['int8'] / q['size_bytes']['fp32']:.2f}; same greedy text at c=8: {q['same_greedy_text_c8']}")  # fmt: skip


async def _autoscale_load(base_url: str, prompts: list[str], args) -> dict:
    """Load on, wait for 2 RUNNING replicas (bounded), hold, load off, wait for 1 RUNNING (bounded)."""
    clients, mt = args.autoscale_clients, args.max_tokens
    timeline: list[tuple[float, dict]] = []  # (seconds since the load started, replicas by state) at each change
    finished: list[tuple[float, int]] = []  # (seconds since the load started, tokens) of each completed request
    errors: list[str] = []
    stop = asyncio.Event()
    t0 = time.perf_counter()

    async def poll_until(done, timeout_s: float) -> float | None:
        deadline = time.perf_counter() + timeout_s
        while True:
            counts = await asyncio.to_thread(replica_counts)
            now = time.perf_counter()
            if not timeline or timeline[-1][1] != counts:
                timeline.append((now - t0, counts))
            if done(counts):
                return now - t0
            if now >= deadline:
                return None
            await asyncio.sleep(args.poll_s)

    async def client_loop(client, k: int):
        i = k
        while not stop.is_set():
            r = await stream_completion(client, base_url, prompts[i % len(prompts)], mt)
            i += clients
            if "error" in r:
                errors.append(r["error"])
                await asyncio.sleep(0.1)
            else:
                finished.append((r["end_s"] - t0, r["tokens"]))

    async with http_client(clients) as client:
        tasks = [asyncio.create_task(client_loop(client, k)) for k in range(clients)]
        up_s = await poll_until(lambda c: c.get("RUNNING", 0) >= 2, args.upscale_timeout_s)
        if up_s is not None:
            await asyncio.sleep(args.hold_s)
        stop.set()
        await asyncio.gather(*tasks)  # each client's request in flight ends
    stop_s = time.perf_counter() - t0
    down_s = None  # without a second replica there is no downscaling to time
    if up_s is not None:
        down_s = await poll_until(lambda c: c.get("RUNNING", 0) <= 1, args.downscale_timeout_s)

    def first(pred, after: float = 0.0):
        return next((t for t, c in timeline if t >= after and pred(c)), None)

    def tokens_per_s(lo: float, hi: float) -> float | None:
        return sum(n for t, n in finished if lo < t <= hi) / (hi - lo) if hi - lo > 0 else None

    asked_s = first(lambda c: sum(c.values()) >= 2)  # a second replica exists: the autoscaler has decided
    stopping_s = first(lambda c: c.get("STOPPING", 0) > 0, stop_s)
    window = args.hold_s
    return {
        "clients": clients,
        "upscale_s": up_s,
        "upscale_decided_s": asked_s,
        "load_stopped_s": stop_s,
        "downscale_s": None if down_s is None else down_s - stop_s,
        "downscale_decided_s": None if stopping_s is None else stopping_s - stop_s,
        "tokens_per_s_1_replica": None if up_s is None else tokens_per_s(max(0.0, up_s - window), up_s),
        "tokens_per_s_2_replicas": None if up_s is None else tokens_per_s(up_s, up_s + window),
        "requests": len(finished),
        "errors": len(errors),
        "first_errors": errors[:3],
        "timeline": [{"t_s": round(t, 2), **c} for t, c in timeline],
    }


def autoscale(ctx: dict, args, results: dict) -> None:
    overrides = [
        "serve.num_cpus_per_replica=1", "serve.max_batch_size=16", "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=2", "serve.autoscaling.target_ongoing_requests=2",
        "serve.autoscaling.upscale_delay_s=1", "serve.autoscaling.downscale_delay_s=5",
    ]  # fmt: skip
    with served(ctx["models"]["fp32"], overrides) as (base_url, start_s):
        before = replica_counts()
        warm_up(base_url, ctx["prompts"], 4, args.max_tokens)
        r = asyncio.run(_autoscale_load(base_url, ctx["prompts"], args))
    results["autoscale"] = {"overrides": overrides, "serve_start_s": start_s, "replicas_at_start": before, **r}
    print(f"\n== autoscaling: deployment {DEPLOYMENT}, min 1 / max 2 replicas of 1 CPU, target_ongoing_requests 2, "
          f"upscale_delay_s 1, downscale_delay_s 5; {r['clients']} clients streaming {args.max_tokens}-token requests "
          f"in a loop ==")  # fmt: skip
    print(f"replicas at start: {before}; Serve start {start_s:.1f} s")
    print(f"load start -> second replica asked for (STARTING): {fmt(r['upscale_decided_s'], '.1f')} s; "
          f"-> RUNNING: {fmt(r['upscale_s'], '.1f')} s (bound {args.upscale_timeout_s:.0f} s)")  # fmt: skip
    print(f"output tokens/s over {args.hold_s:.0f} s before / after the second replica ran: "
          f"{fmt(r['tokens_per_s_1_replica'], ',.0f')} / {fmt(r['tokens_per_s_2_replicas'], ',.0f')} (requests that ended "
          f"in the window)")  # fmt: skip
    print(f"load stopped at {r['load_stopped_s']:.1f} s ({r['requests']} requests, {r['errors']} failed) -> a replica "
          f"STOPPING: {fmt(r['downscale_decided_s'], '.1f')} s; -> 1 RUNNING: {fmt(r['downscale_s'], '.1f')} s "
          f"(bound {args.downscale_timeout_s:.0f} s)")  # fmt: skip
    print("timeline (s since the load started: replicas by state): "
          + "; ".join(f"{e['t_s']}: " + ", ".join(f"{k} {v}" for k, v in e.items() if k != "t_s") for e in r["timeline"]))
    if r["errors"]:
        print(f"failed requests, e.g. {r['first_errors'][0]}")


# --- main -------------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 30 training steps, 16-token completions, fewer requests, shorter holds")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps of the served model (default 300; quick 30)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per completion (default 32; quick 16)")
    parser.add_argument("--concurrency", default="1,8,32", help="concurrency levels of the latency section")
    parser.add_argument("--waves", type=int, default=None, help="requests per client at each level (default 6; quick 2)")
    parser.add_argument("--min-requests", type=int, default=None, help="requests at least, at each level (default 16; quick 4)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="serve.max_batch_size of the latency section")
    parser.add_argument("--batching-concurrency", type=int, default=16)
    parser.add_argument("--preset", default="demo", help="model preset to train and serve (demo: 1.3M parameters; 10m: 12M)")
    parser.add_argument("--replica-cpus", type=float, default=CORES,
                        help="serve.num_cpus_per_replica (and torch threads) of the latency and batching replica")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the quantized section (default 3; quick 1)")
    parser.add_argument("--autoscale-clients", type=int, default=12)
    parser.add_argument("--hold-s", type=float, default=None, help="load kept on after the second replica runs (default 10; quick 4)")
    parser.add_argument("--upscale-timeout-s", type=float, default=90.0)
    parser.add_argument("--downscale-timeout-s", type=float, default=150.0)
    parser.add_argument("--poll-s", type=float, default=0.25, help="interval of ray.serve.status() polls")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    defaults = {"train_steps": (300, 30), "max_tokens": (32, 16), "waves": (6, 2), "min_requests": (16, 4),
                "rounds": (3, 1), "hold_s": (10.0, 4.0)}  # fmt: skip
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in chosen]
    return args


def main() -> None:
    args = parse_args()
    import ray
    import torch

    from raylm.runtime import init_ray

    torch.set_num_threads(CORES)  # the floor uses every core, as the latency section's replica does
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict = {"cores": CORES, "ray": ray.__version__, "torch": torch.__version__, "args": vars(args)}
    init_ray(num_cpus=max(4, CORES))  # logical CPUs: the train stage's Ray Data reads and the replicas
    try:
        token_cfg = demo_tokens()
        models = prepare_models(token_cfg, args.train_steps, args.seed, CORES, args.preset)
        results["model"] = models
        print(f"\n== model: {args.preset} preset, {models['num_params']:,} parameters (int8 copy: {models['int8_num_params']:,}), "
              f"context {models['block_size']}, trained {args.train_steps} steps "
              f"({'found in cache' if models['found_in_cache'] else 'trained now'}, {models['train_seconds']:.0f} s); "
              f"final train loss {fmt(models['train_loss'], '.3f')}, val loss {fmt(models['train_val_loss'], '.3f')} ==")  # fmt: skip
        print(f"fp32: {models['fp32']}\nint8: {models['int8']}")
        needed = max([request_count(args, c) for c in [*args.concurrency, args.batching_concurrency, 8]])
        ctx = {"token_cfg": token_cfg, "models": models, "prompts": corpus_prompts(token_cfg, max(needed, 64))}
        sections = {"latency": latency, "batching": batching, "quantized": quantized, "autoscale": autoscale}
        for name in args.sections:
            started, load = time.perf_counter(), os.getloadavg()[0]
            sections[name](ctx, args, results)
            results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - started, 1)
            # Another process on these few cores changes every figure: the load average shows one was there.
            results.setdefault("load_average_1min", {})[name] = [load, os.getloadavg()[0]]
            print(f"[{name}: {time.perf_counter() - started:.0f} s; 1-minute load average at its start {load:.1f}, "
                  f"at its end {os.getloadavg()[0]:.1f}, on {CORES} cores]")  # fmt: skip
            (RESULTS / results_name(args)).write_text(json.dumps(results, indent=2, default=str))
    finally:
        with contextlib.suppress(Exception):  # each section stops its own Serve; this covers a failure inside one
            from ray import serve

            serve.shutdown()
        ray.shutdown()
    print(f"\nresults: {RESULTS / results_name(args)}; section seconds: {results.get('section_seconds')}")


if __name__ == "__main__":
    main()
