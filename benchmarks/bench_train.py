"""Train stage: overhead against a bare PyTorch loop, memory per ZeRO stage, and learning.

    python benchmarks/bench_train.py                          # every section, full size (~60 min on 2 quiet cores)
    python benchmarks/bench_train.py --steps 30 --iters 100   # a quick check that every section runs end to end
    python benchmarks/bench_train.py --sections overhead --presets demo,10m

Token data: the bundled corpus through raylm's own prepare and tokenize stages at configs/demo.yaml's
settings (byte-level BPE 4,096, seq_len 128), cached in benchmarks/results/cache/ (train_common.py).

1. overhead: steady-state tokens/s of `raylm train` with 1 Ray Train worker (DeepSpeed, the default
   zero_stage 1, which a single data-parallel rank runs as ZeRO 0; fp32) against a bare PyTorch loop in a
   process of its own, started with the environment raylm gives its CPU workers (the malloc settings of
   train.keep_freed_memory, which speed up both loops): the same GPT, batch (micro-batch 16 x 128 tokens),
   seed, AdamW parameter groups, LR schedule, gradient clipping, torch thread count and data order (read
   from the token shards by numpy memmap). Steady state: the log windows after the first --skip-steps
   steps (raylm reports tokens/s per window; the bare loop is timed the same way). The bare loop runs
   with Ray shut down, and each raylm run starts a fresh local Ray (raylm.runtime's settings), as
   `raylm train` does. The two run in turn, bare first and last, --rounds raylm runs in all, since this
   VM's speed drifts by 10-15% over minutes (one run of each measured the drift as much as raylm): each
   raylm run is compared with the mean of the bare runs before and after it, and the ratio is the median
   of these. Two rows: --threads torch threads in both loops (all cores: Ray's own processes, ~15% of a
   core between them, take from training), and one thread fewer (--spare-core: a core left to them, so
   the ratio is what raylm's loop, Ray Train and DeepSpeed cost). Each run's CPU use is sampled from
   /proc during its training steps (train_common.CpuSampler): the cores the training process used and
   those all other processes used, so that each ratio splits into (cores of raylm's worker / cores of
   the bare loop) x (tokens per CPU-second of the worker / of the bare loop). Each row ends with the same three
   loops' CPU per step in one process without Ray (train_common.step_costs: the bare step, DeepSpeed's engine,
   raylm's step around it; --step-blocks blocks in turn), which tells the cost of raylm's and DeepSpeed's code
   from the cost of running inside Ray's processes. Then data-parallel
   scaling: 1 worker with all --threads, 1 worker with 1 thread, 2 workers with 1 thread each (the
   machine has 2 cores: two workers split them, so "2 workers / 1 worker x 2 threads" compares data
   parallelism with intra-op threading on the same cores, and "2 workers / 1 worker x 1 thread" is the
   scaling efficiency, 2.0 being perfect).
2. memory: one model (default the 125m preset cut to 6 layers, ~46M parameters, so that parameters and
   optimizer states dominate a worker's memory) trained for a few steps on 2 workers at ZeRO 0, 1, 2, 3:
   per-worker peak RSS and parameter elements held per worker, as the train loop reports them
   (`peak_rss_mb`, `params_per_worker`, the max over ranks; "n/a" where this raylm does not report them).
   ZeRO 3 should hold about half of the parameters on each of 2 workers. Peak RSS is each process's
   high-water mark (ru_maxrss), start-up included, when every rank builds the whole model before
   DeepSpeed shards it.
3. curves: loss curves of raylm (1 worker, zero_stage 1, run as ZeRO 0) and of the bare loop, same seed, data order and
   budget (the same two runs as section 1 when both run): both printed at a few steps, the max and mean
   absolute difference, and a PNG overlay in benchmarks/results/.
4. shakespeare: nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, context 64, batch 12, 2,000
   iterations, lr 1e-3 cosine to 1e-4, beta2 0.99, weight decay 0.1, dropout 0, 100 warmup steps as in
   its config) trained by raylm (1 worker) on the corpus's Shakespeare at character level, split 90/10
   like nanoGPT; the validation loss (over the whole validation split) against nanoGPT's published ~1.88
   on tiny Shakespeare (1.1 MB; the bundled Shakespeare is larger and other text, so close, not equal).

Results: benchmarks/results/train.json, train_curves.png, train_shakespeare_char_loss_curve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
# The workers' Ray Data streams inherit this (the local Ray starts from this process): no progress bars
# between the benchmark's own lines.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from train_common import (  # noqa: E402
    CACHE, DEMO_CONFIG, RESULTS, CpuSampler, bare_train_process, compare_curves, demo_tokens, plot_overlay, sample_steps,
    shakespeare_char_tokens, steady_tokens_per_s, step_costs_process,
)  # fmt: skip

CORES = os.cpu_count() or 1
SECTIONS = ("overhead", "memory", "curves", "shakespeare")
NANOGPT_VAL_LOSS = 1.88  # nanoGPT README: the CPU recipe on character-level tiny Shakespeare


class Runs:
    """raylm train runs in a scratch directory, each config run once per benchmark (sections share them)."""

    def __init__(self, scratch: Path, seed: int):
        self.scratch, self.seed = scratch, seed
        self._done: dict[tuple, dict] = {}
        self._bare: dict[tuple, dict] = {}

    def config(self, overrides: list[str], config: Path | None = DEMO_CONFIG, workdir: Path = CACHE / "demo"):
        from raylm.config import load_config

        return load_config(config, self.overrides(overrides, workdir))

    def overrides(self, overrides: list[str], workdir: Path = CACHE / "demo") -> list[str]:
        """`overrides` after the benchmark's own: the token data's workdir and the seed."""
        return [f"run.workdir={workdir.resolve()}", f"run.seed={self.seed}", *overrides]

    def raylm(self, name: str, overrides: list[str], keep: tuple[str, ...] = (), repeat: int = 0, **where) -> dict:
        """The train stage on the config; returns {summary, final, history, seconds}; the output is deleted (but `keep` files).
        `repeat` > 0: a fresh run of a config that already ran (timing rounds)."""
        from raylm.stages import run_stage

        key = (tuple(overrides), tuple(sorted(where.items())), repeat)
        if key in self._done:
            return self._done[key]
        output = self.scratch / f"{name}-{len(self._done)}"
        cfg = self.config([f"run.name={name}", f"train.output={output}", "train.tensorboard=false", *overrides], **where)
        started = time.perf_counter()
        summary = run_stage("train", cfg)
        metrics = json.loads(Path(summary["metrics"]).read_text())
        run = {"summary": summary, "final": metrics["final"], "history": metrics["history"],
               "seconds": time.perf_counter() - started, "kept": {}}  # fmt: skip
        for f in keep:
            RESULTS.mkdir(parents=True, exist_ok=True)
            target = RESULTS / f"train_{name}_{f}"
            shutil.copy(output / f, target)
            run["kept"][f] = str(target)
        shutil.rmtree(output, ignore_errors=True)  # checkpoints of the bigger models are hundreds of MB
        self._done[key] = run
        return run

    def bare(self, overrides: list[str], threads: int, repeat: int = 0) -> dict:
        """train_common.bare_train on the config with `threads` torch threads, in a new process with the environment
        of raylm's workers; run once per config (and `repeat`)."""
        key = (tuple(overrides), threads, repeat)
        if key not in self._bare:
            self._bare[key] = bare_train_process(DEMO_CONFIG, self.overrides(overrides), threads)
        return self._bare[key]


def speed_overrides(preset: str, args) -> list[str]:
    """Section 1 and 3's runs: demo.yaml's batch, fp32, no evaluation or checkpoint before the end."""
    return [
        f"train.model.preset={preset}", "train.precision=fp32", f"train.max_steps={args.steps}",
        f"train.log_interval_steps={args.log_every}", f"train.eval_interval_steps={args.steps}",
        f"train.checkpoint_interval_steps={args.steps}",
    ]  # fmt: skip


def workers(num: int, threads: int, zero: int) -> list[str]:
    """Overrides for `num` Ray Train workers of `threads` CPUs and torch threads each, at ZeRO stage `zero`."""
    return [f"train.num_workers={num}", f"train.cpus_per_worker={threads}", f"train.torch_threads={threads}",
            f"train.zero_stage={zero}"]  # fmt: skip


def overhead_threads(args) -> list[int]:
    """Torch threads of the overhead rows: --threads, and with --spare-core one fewer (a core left for Ray's own processes)."""
    return [args.threads, args.threads - 1] if args.spare_core and args.threads > 1 else [args.threads]


def cpu_split(cores: dict[str, list[dict | None]], round_ratios: list[float]) -> dict:
    """The overhead ratio of each round as (cores of raylm's worker / the bare loop's, the mean of the bare runs
    around it) x (tokens per CPU-second of the worker / the bare loop's); medians over the rounds (None: unmeasured)."""
    core_ratios, per_core = [], []
    for i, ratio in enumerate(round_ratios):
        raylm, before, after = cores["raylm"][i], cores["bare"][i], cores["bare"][i + 1]
        if raylm and before and after:
            core_ratios.append(raylm["trainer_cores"] / ((before["trainer_cores"] + after["trainer_cores"]) / 2))
            per_core.append(ratio / core_ratios[-1])
    return {
        "cores_ratio": statistics.median(core_ratios) if core_ratios else None,
        "per_core_ratio": statistics.median(per_core) if per_core else None,
    }


def cores_text(cores: dict[str, list[dict | None]], i: int) -> str:
    """Round i's CPU use: raylm's worker and all other processes, then the bare run before it."""
    def pair(c: dict | None) -> str:
        return f"{c['trainer_cores']:.2f} + others {c['other_cores']:.2f}" if c else "n/a"

    return f"raylm worker {pair(cores['raylm'][i])}, bare {pair(cores['bare'][i])}"


def overhead(runs: Runs, args, results: dict) -> None:
    """The bare loop and raylm (1 worker, the default zero_stage 1, which one rank runs as ZeRO 0) in turn:
    bare, raylm, bare, ..., raylm, bare for --rounds raylm runs. This VM's speed drifts by 10-15% over
    minutes, so each raylm run is compared with the mean of the two bare runs around it (a linear drift
    cancels); the ratio is the median of those per-round ratios."""
    import ray

    from raylm.train.deepspeed_config import effective_zero_stage

    skip = args.skip_steps
    rows = []

    def bare_run(preset_overrides: list[str], one: list[str], threads: int, r: int, cores: list) -> float:
        # No Ray at all: Ray's own processes take CPU from training, and that is part of what raylm costs.
        # raylm's next run then starts a fresh local Ray, as `raylm train` does.
        ray.shutdown()
        with CpuSampler(threads) as cpu:
            bare = runs.bare([*preset_overrides, *one], threads, repeat=r)
        cores.append(cpu.result())
        return steady_tokens_per_s(bare["history"], skip)

    for preset in args.presets.split(","):
        base = speed_overrides(preset, args)
        for threads in overhead_threads(args):
            one = workers(1, threads, 1)
            cores: dict[str, list[dict | None]] = {"bare": [], "raylm": []}  # CpuSampler results, run by run
            tps: dict[str, list[float]] = {"bare": [bare_run(base, one, threads, 0, cores["bare"])], "raylm": []}
            entry = {"preset": preset, "threads": threads, "rounds": args.rounds}
            for r in range(args.rounds):
                with CpuSampler(threads) as cpu:
                    run = runs.raylm(f"overhead-{preset}-z1", [*base, *one], repeat=r)
                cores["raylm"].append(cpu.result())
                tps["raylm"].append(steady_tokens_per_s(run["history"], skip))
                tps["bare"].append(bare_run(base, one, threads, r + 1, cores["bare"]))
                entry.update(num_params=run["summary"]["num_params"], fit_seconds=run["summary"]["seconds"])
            cfg = runs.config([*base, *one]).train
            around = [(a + b) / 2 for a, b in zip(tps["bare"], tps["bare"][1:])]  # the bare runs before and after each raylm run
            round_ratios = [t / b for t, b in zip(tps["raylm"], around)]
            entry.update(
                zero_stage=cfg.zero_stage, effective_zero_stage=effective_zero_stage(cfg, 1),
                bare_tokens_per_s=statistics.median(tps["bare"]), raylm_tokens_per_s=statistics.median(tps["raylm"]),
                ratio=statistics.median(round_ratios),
                bare_runs=tps["bare"], bare_around=around, raylm_rounds=tps["raylm"], round_ratios=round_ratios,
                cpu=cores, **cpu_split(cores, round_ratios),
            )  # fmt: skip
            if args.step_blocks:  # where the code's own cost is: the three loops in one process, no Ray
                ray.shutdown()
                entry["in_process"] = step_costs_process(DEMO_CONFIG, runs.overrides([*base, *one]), threads,
                                                         args.step_blocks, args.block_steps)  # fmt: skip
            rows.append(entry)
    results["overhead"] = rows
    micro = runs.config([]).train.micro_batch_size
    print(f"\n== overhead: raylm (1 Ray Train worker, DeepSpeed, fp32) vs a bare PyTorch loop; micro-batch {micro} x "
          f"128 tokens, {args.steps} steps, steady state after step {skip}, {CORES} cores, "
          f"{args.rounds} raylm runs between {args.rounds + 1} bare runs ==")  # fmt: skip
    print(f"{'preset':>7} {'params':>10} {'threads':>7} {'ZeRO':>11} {'bare tok/s':>11} {'raylm tok/s':>12} {'ratio':>6} {'fit s':>6}")
    for r in rows:
        zero = f"{r['zero_stage']} -> {r['effective_zero_stage']}"
        print(f"{r['preset']:>7} {r['num_params']:>10,} {r['threads']:>7} {zero:>11} {r['bare_tokens_per_s']:>11,.0f} "
              f"{r['raylm_tokens_per_s']:>12,.0f} {r['ratio']:>6.3f} {r['fit_seconds']:>6.0f}")  # fmt: skip
        for i, t in enumerate(r["raylm_rounds"]):
            print(f"{'':>7} round {i + 1}: raylm {t:,.0f}, bare before / after {r['bare_runs'][i]:,.0f} / "
                  f"{r['bare_runs'][i + 1]:,.0f} ({r['round_ratios'][i]:.3f}); cores: {cores_text(r['cpu'], i)}")  # fmt: skip
        if r["cores_ratio"] is not None:
            print(f"{'':>7} ratio {r['ratio']:.3f} = cores {r['cores_ratio']:.3f} (raylm's worker's cores / the bare loop's) "
                  f"x tokens per CPU-second {r['per_core_ratio']:.3f} (raylm's worker / the bare loop); medians over rounds")  # fmt: skip
        if "in_process" in r:
            ms = r["in_process"]
            print(f"{'':>7} in one process without Ray, CPU ms per step: bare {ms['bare']['cpu_ms']:.1f}, DeepSpeed's engine "
                  f"{ms['deepspeed']['cpu_ms']:.1f} ({ms['deepspeed']['cpu_ms'] / ms['bare']['cpu_ms']:.3f}), raylm's step "
                  f"{ms['raylm']['cpu_ms']:.1f} ({ms['raylm']['cpu_ms'] / ms['bare']['cpu_ms']:.3f}); {args.step_blocks} blocks "
                  f"of {args.block_steps} steps in turn, medians")  # fmt: skip
    print("target: ratio >= 0.9 (ratio: the median over rounds of raylm / the mean of the bare runs before and after it; tok/s: medians; "
          "threads: torch threads of both loops (with --spare-core, a row with one fewer leaves a core to Ray's own processes); "
          "ZeRO: the config's zero_stage -> the stage one data-parallel rank runs; "
          "fit s: the last round's whole Ray Train fit, start-up, export and checkpoint included)")

    if args.skip_scaling:
        return
    preset = args.presets.split(",")[0]
    base = speed_overrides(preset, args)
    full = runs.raylm(f"overhead-{preset}-z1", [*base, *workers(1, args.threads, 1)])
    one = runs.raylm(f"scaling-{preset}-1x1", [*base, *workers(1, 1, 1)])
    two = runs.raylm(f"scaling-{preset}-2x1", [*base, *workers(2, 1, 1)])
    tps = {k: steady_tokens_per_s(r["history"], skip) for k, r in (("1x_all", full), ("1x1", one), ("2x1", two))}
    results["scaling"] = {
        "preset": preset, "threads": args.threads, "tokens_per_s": tps,
        "ratio_2x1_over_1x_all": tps["2x1"] / tps["1x_all"], "ratio_2x1_over_1x1": tps["2x1"] / tps["1x1"],
    }  # fmt: skip
    s = results["scaling"]
    print(f"\n== data-parallel scaling, preset {preset}, zero_stage 1 (ZeRO 0 on 1 worker), global batch = workers x {micro} sequences, {CORES} cores ==")
    print(f"1 worker x {args.threads} threads: {tps['1x_all']:,.0f} tokens/s; 1 worker x 1 thread: {tps['1x1']:,.0f}; "
          f"2 workers x 1 thread: {tps['2x1']:,.0f}")  # fmt: skip
    print(f"ratio 2 workers / 1 worker x {args.threads} threads (same cores): {s['ratio_2x1_over_1x_all']:.2f}; "
          f"2 workers / 1 worker x 1 thread: {s['ratio_2x1_over_1x1']:.2f} (2.00 = perfect)")  # fmt: skip


def memory(runs: Runs, args, results: dict) -> None:
    base = [
        f"train.model.preset={args.memory_preset}", f"train.max_steps={args.memory_steps}", "train.micro_batch_size=1",
        "train.log_interval_steps=1", f"train.eval_interval_steps={args.memory_steps}",
        f"train.checkpoint_interval_steps={args.memory_steps}", "train.eval_batches=1", "train.precision=fp32",
    ]  # fmt: skip
    if args.memory_layers:
        base.append(f"train.model.n_layer={args.memory_layers}")
    rows = []
    for zero in (0, 1, 2, 3):
        run = runs.raylm(f"memory-z{zero}", [*base, *workers(2, 1, zero)])
        rows.append({
            "zero_stage": zero, "num_params": run["summary"]["num_params"],
            "peak_rss_mb": reported(run, "peak_rss_mb"), "params_per_worker": reported(run, "params_per_worker"),
            "fit_seconds": run["summary"]["seconds"], "loss": run["summary"]["loss"],
        })  # fmt: skip
    results["memory"] = rows
    layers = f", {args.memory_layers} layers" if args.memory_layers else ""
    print(f"\n== memory: preset {args.memory_preset}{layers} ({rows[0]['num_params']:,} params), 2 workers, fp32, "
          f"micro-batch 1 x 128 tokens, {args.memory_steps} steps ==")  # fmt: skip
    print(f"{'ZeRO':>4} {'peak RSS MB/worker':>19} {'params/worker':>14} {'of all':>7} {'fit s':>6}")
    for r in rows:
        rss = f"{r['peak_rss_mb']:,.0f}" if r["peak_rss_mb"] is not None else "n/a"
        held = f"{r['params_per_worker']:,}" if r["params_per_worker"] is not None else "n/a"
        frac = f"{r['params_per_worker'] / r['num_params']:.2f}" if r["params_per_worker"] is not None else "n/a"
        print(f"{r['zero_stage']:>4} {rss:>19} {held:>14} {frac:>7} {r['fit_seconds']:>6.0f}")
    print("expected: ZeRO 3 holds about 1/2 of the parameters on each of 2 workers. Peak RSS is each process's "
          "high-water mark, start-up included (every rank builds the whole model before DeepSpeed shards it)")  # fmt: skip


def reported(run: dict, key: str):
    """A figure of the run: from its summary, else its final metrics, else the largest in its history; None if absent."""
    for source in (run["summary"], run["final"]):
        if source.get(key) is not None:
            return source[key]
    seen = [h[key] for h in run["history"] if h.get(key) is not None]
    return max(seen) if seen else None


def curves(runs: Runs, args, results: dict) -> None:
    preset = args.presets.split(",")[0]
    base = speed_overrides(preset, args)
    bare = runs.bare([*base, *workers(1, args.threads, 1)], args.threads)
    run = runs.raylm(f"overhead-{preset}-z1", [*base, *workers(1, args.threads, 1)])
    c = compare_curves(run["history"], bare["history"])
    png = plot_overlay({"raylm (1 worker)": run["history"], "bare PyTorch loop": bare["history"]},
                       RESULTS / "train_curves.png", f"preset {preset}: same seed, data order and budget")  # fmt: skip
    results["curves"] = {
        "preset": preset, "steps": args.steps, **c, "raylm_val_loss": run["summary"]["val_loss"],
        "bare_val_loss": bare["val_loss"], "png": str(png),
    }  # fmt: skip
    print(f"\n== learning: raylm vs the bare loop, preset {preset}, seed {runs.seed}, {args.steps} steps "
          "(training loss = mean over each log window) ==")  # fmt: skip
    print(f"{'step':>6} {'raylm':>8} {'bare':>8} {'diff':>9}")
    values = dict(zip(c["steps"], zip(c["a"], c["b"])))
    for step in sample_steps(c["steps"], 8):
        a, b = values[step]
        print(f"{step:>6} {a:>8.4f} {b:>8.4f} {a - b:>+9.2e}")
    print(f"max |diff| {c['max_abs_diff']:.2e}, mean |diff| {c['mean_abs_diff']:.2e} over {len(c['steps'])} windows; "
          f"validation loss raylm {run['summary']['val_loss']:.4f}, bare {bare['val_loss']:.4f}; overlay: {png}")  # fmt: skip


def shakespeare(runs: Runs, args, results: dict) -> None:
    block, batch = 64, 12
    token_cfg, data = shakespeare_char_tokens(seq_len=block)
    tokens = Path(token_cfg.tokenize.output)
    iters = args.iters
    val_batches = data["sequences"]["validation"] // batch
    overrides = [
        "train.model.preset=demo", "train.model.dropout=0.0", *workers(1, args.threads, 1), "train.precision=fp32",
        f"train.micro_batch_size={batch}", f"train.max_steps={iters}", "train.optimizer.lr=1e-3",
        "train.optimizer.min_lr_ratio=0.1", "train.optimizer.beta2=0.99", "train.optimizer.weight_decay=0.1",
        f"train.optimizer.warmup_steps={min(100, iters // 10)}", "train.optimizer.grad_clip=1.0",
        f"train.log_interval_steps={max(1, iters // 40)}", f"train.eval_interval_steps={max(1, iters // 4)}",
        f"train.checkpoint_interval_steps={iters}", f"train.eval_batches={val_batches}", f"train.data={tokens}",
        "prepare.input=unused", f"tokenize.input={token_cfg.tokenize.input}", f"tokenize.output={tokens}",
    ]  # fmt: skip
    run = runs.raylm("shakespeare_char", overrides, keep=("loss_curve.png",), config=None, workdir=CACHE / "shakespeare_char")
    s = run["summary"]
    vals = [(h["step"], h["val_loss"]) for h in run["history"] if "val_loss" in h]
    results["shakespeare"] = {
        "iters": iters, "block_size": block, "batch_size": batch, "num_params": s["num_params"],
        "tokenization": "character level: tokenizers BPE with the text's characters as vocabulary and no merges, "
                        "plus <|endoftext|> between documents",
        **data, "val_loss": s["val_loss"], "train_loss": s["loss"], "val_curve": vals,
        "nanogpt_val_loss": NANOGPT_VAL_LOSS, "ratio_to_nanogpt": s["val_loss"] / NANOGPT_VAL_LOSS,
        "fit_seconds": s["seconds"], "tokens_per_s": s["tokens_per_s"], "png": run["kept"].get("loss_curve.png"),
    }  # fmt: skip
    r = results["shakespeare"]
    print(f"\n== learning: nanoGPT's CPU recipe on character-level Shakespeare, trained by raylm (1 worker), {iters} iterations ==")
    print(f"data: {r['documents']['train']} + {r['documents']['validation']} documents, {r['chars']['train']:,} + "
          f"{r['chars']['validation']:,} characters (train + validation, 90/10; validation: {', '.join(r['validation_works'])}); "
          f"tiny Shakespeare has 1,115,394")  # fmt: skip
    print(f"tokens: {r['tokenization']}; vocabulary {r['vocab_size']} (tiny Shakespeare: 65); "
          f"{r['sequences']['train']:,} + {r['sequences']['validation']:,} rows of {block} + 1")  # fmt: skip
    print(f"model: {r['num_params']:,} params (4 layers, 4 heads, 128 wide), batch {batch}, context {block}; "
          f"{r['fit_seconds']:.0f} s, {r['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    print("validation loss by step: " + ", ".join(f"{step}: {v:.3f}" for step, v in vals))
    print(f"final train loss {r['train_loss']:.3f}, validation loss {r['val_loss']:.3f} (whole validation split); "
          f"nanoGPT reports ~{NANOGPT_VAL_LOSS} at 2,000 iterations: ratio {r['ratio_to_nanogpt']:.2f}; curve: {r['png']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--steps", type=int, default=300, help="steps of each overhead / curves run")
    parser.add_argument("--log-every", type=int, default=10, help="steps per log window (a tokens/s and loss figure)")
    parser.add_argument("--skip-steps", type=int, default=None, help="steps left out of the steady state (default: 10%%, at least one window)")
    parser.add_argument("--skip-scaling", action="store_true", help="the overhead section without its data-parallel scaling runs")
    parser.add_argument("--rounds", type=int, default=4, help="raylm runs of the overhead section, each between two bare runs (median of their ratios)")
    parser.add_argument("--presets", default="demo", help="model presets of the overhead section (the first also for scaling and curves)")
    parser.add_argument("--step-blocks", type=int, default=8,
                        help="overhead: blocks of the in-process comparison of the bare, DeepSpeed and raylm steps (0: skip it)")
    parser.add_argument("--block-steps", type=int, default=10, help="optimizer steps per block of that comparison")
    parser.add_argument("--threads", type=int, default=CORES, help="torch threads of the single-worker runs and the bare loop")
    parser.add_argument("--spare-core", action=argparse.BooleanOptionalAction, default=True,
                        help="also an overhead row at --threads - 1 in both loops, leaving a core to Ray's own processes")
    parser.add_argument("--memory-preset", default="125m")
    parser.add_argument("--memory-layers", type=int, default=6, help="n_layer override of the memory model (0: the preset's)")
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--iters", type=int, default=2000, help="iterations of the Shakespeare run (nanoGPT: 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.skip_steps is None:
        args.skip_steps = max(args.log_every, args.steps // 10 // args.log_every * args.log_every)
    if args.skip_steps >= args.steps:
        parser.error(f"--skip-steps {args.skip_steps} leaves no window of the {args.steps} steps")

    from raylm.runtime import init_ray

    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict = {"cores": CORES, "args": vars(args)}
    init_ray(num_cpus=max(4, 2 * CORES))  # logical CPUs: the workers hold theirs, Ray Data's 0-CPU reads run beside
    demo_tokens()
    with tempfile.TemporaryDirectory(prefix="raylm-bench-train-") as scratch:
        runs = Runs(Path(scratch), args.seed)
        sections = {"overhead": overhead, "memory": memory, "curves": curves, "shakespeare": shakespeare}
        for name in SECTIONS:
            if name in chosen:
                sections[name](runs, args, results)
                (RESULTS / "train.json").write_text(json.dumps(results, indent=2, default=str))  # after each section
    print(f"\nresults: {RESULTS / 'train.json'}")


if __name__ == "__main__":
    main()
