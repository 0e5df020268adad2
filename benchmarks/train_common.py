"""Shared parts of the train benchmark: cached token data, a bare PyTorch training loop, curve arithmetic.

Token data (cached under benchmarks/results/cache/, so a second run skips straight to training):
- demo: the bundled corpus through raylm's own prepare and tokenize stages at configs/demo.yaml's
  settings (byte-level BPE 4,096, seq_len 128);
- Shakespeare, character level: the Shakespeare documents of that prepare output (the works whose
  author is Shakespeare in the corpus's ATTRIBUTION.md; planted variants left out), in id order,
  the first 90% of the characters for training and the rest for validation (cut at a document
  boundary, as nanoGPT cuts its one file at 90%), tokenized by raylm's tokenize stage with a
  character vocabulary: a `tokenizers` BPE model whose vocabulary is the text's distinct
  characters and which has no merges, so every character is one token (plus <|endoftext|>).

The bare loop is what raylm's worker loop does without Ray or DeepSpeed, in a process of its own
started with the environment raylm gives its CPU workers (their malloc settings): the same GPT
(same seed, so the same initial weights), raylm.train.optim.build_optimizer (AdamW, the same
parameter groups) and lr_factor (the same schedule), gradient clipping by
`torch.nn.utils.clip_grad_norm_`, and the same micro-batches in the same order, gathered from the
memory-mapped token shards with the SequenceOrder that raylm's data stream uses.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
ATTRIBUTION = ROOT / "platform/raylm/assets/demo_corpus/ATTRIBUTION.md"


def demo_tokens(workdir: Path = CACHE / "demo"):
    """configs/demo.yaml's prepare and tokenize stages run on the bundled corpus into `workdir` (no-ops when cached).

    Returns the resolved config, whose train.data is the token output.
    """
    from raylm.config import load_config
    from raylm.stages import run_stage

    # overwrite: a cache written by an older config is replaced, not an error
    cfg = load_config(DEMO_CONFIG, [f"run.workdir={workdir.resolve()}", "run.overwrite=true"])
    run_stage("prepare", cfg)
    run_stage("tokenize", cfg)
    return cfg


def shakespeare_works(attribution: Path = ATTRIBUTION) -> set[str]:
    """Work ids of the bundled corpus whose author is Shakespeare, read from the table in ATTRIBUTION.md."""
    works = set()
    for line in attribution.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[2].startswith("Shakespeare"):
            works.add(cells[0])
    if not works:
        raise RuntimeError(f"{attribution}: no work by Shakespeare found in its table")
    return works


def read_prepared(prepared: Path) -> list[tuple[str, str]]:
    """(id, text) of every document of a prepare output, both splits."""
    import pyarrow.parquet as pq

    docs = []
    for split in ("train", "validation"):
        for f in sorted((prepared / split).glob("*.parquet")):
            table = pq.read_table(f, columns=["id", "text"])
            docs += zip(table.column("id").to_pylist(), table.column("text").to_pylist())
    return docs


def select_works(docs: list[tuple[str, str]], works: set[str]) -> list[tuple[str, str]]:
    """The documents `<work>/<number>` of these works, in id order; planted variants (`...#copy`) left out."""
    keep = [(i, t) for i, t in docs if "#" not in i and i.split("/", 1)[0] in works]
    return sorted(keep)


def split_by_chars(docs: list[tuple[str, str]], train_fraction: float = 0.9) -> tuple[list, list]:
    """(train, validation): the first documents holding `train_fraction` of the characters, and the rest."""
    sizes = np.cumsum([len(t) for _, t in docs])
    cut = int(np.searchsorted(sizes, train_fraction * sizes[-1], side="right"))
    cut = min(max(cut, 1), len(docs) - 1)  # both splits get at least one document
    return docs[:cut], docs[cut:]


def char_tokenizer(texts: list[str]):
    """A `tokenizers` Tokenizer with one token per distinct character of `texts` (a BPE without merges)."""
    from tokenizers import Tokenizer, decoders, models

    chars = sorted(set().union(*map(set, texts)))
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tokenizer.decoder = decoders.Fuse()  # ids -> the characters joined, nothing in between
    return tokenizer


def write_prepared(root: Path, splits: dict[str, list[tuple[str, str]]], config: dict):
    """A prepare-shaped output (one Parquet file of id, text per split) that raylm's tokenize stage reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm.artifacts import stage_output

    with stage_output(root, "prepare", config, overwrite=True) as out:
        if not out.done:
            for split, docs in splits.items():
                (Path(out.tmp) / split).mkdir()
                ids, texts = zip(*docs)
                pq.write_table(pa.table({"id": list(ids), "text": list(texts)}), Path(out.tmp) / split / "part-00000.parquet")
            out.stats = {split: {"documents": len(d), "chars": sum(len(t) for _, t in d)} for split, d in splits.items()}
    return root


def shakespeare_char_tokens(seq_len: int, workdir: Path = CACHE / "shakespeare_char"):
    """Character-level Shakespeare token data (cached); returns (config with tokenize.output set, data stats)."""
    from raylm.config import load_config
    from raylm.stages import run_stage

    demo = demo_tokens()
    docs = select_works(read_prepared(Path(demo.prepare.output)), shakespeare_works())
    train, validation = split_by_chars(docs, 0.9)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_file = workdir / "chars.json"
    tokenizer_json = char_tokenizer([t for _, t in docs]).to_str()
    if not tokenizer_file.exists() or tokenizer_file.read_text() != tokenizer_json:  # its mtime is in tokenize's fingerprint
        tokenizer_file.write_text(tokenizer_json)
    prepared = write_prepared(workdir / "prepared", {"train": train, "validation": validation},
                              {"shakespeare_char": [i for i, _ in docs], "train_fraction": 0.9})  # fmt: skip
    cfg = load_config(None, [
        f"run.workdir={workdir.resolve()}", "run.overwrite=true", "prepare.input=unused", f"tokenize.input={prepared.resolve()}",
        f"tokenize.tokenizer={tokenizer_file.resolve()}", f"tokenize.seq_len={seq_len}",
        f"tokenize.output={(workdir / f'tokens-{seq_len}').resolve()}",
    ])  # fmt: skip
    stats = run_stage("tokenize", cfg)
    data = {
        "documents": {"train": len(train), "validation": len(validation)},
        "chars": {"train": sum(len(t) for _, t in train), "validation": sum(len(t) for _, t in validation)},
        "vocab_size": stats["vocab_size"],
        "tokens": stats["tokens"],
        "sequences": stats["num_sequences"],
        "validation_works": sorted({i.split("/")[0] for i, _ in validation}),
    }
    return cfg, data


def bare_model(train_cfg, gpt, seed: int, max_steps: int):
    """The bare loop's (model, optimizer, LR schedule): the GPT seeded as raylm's engine build seeds it (the same
    initial weights), raylm.train.optim.build_optimizer (AdamW, the same parameter groups) and lr_schedule."""
    import torch

    from raylm.model.gpt import GPT
    from raylm.train.optim import build_optimizer, lr_schedule

    torch.manual_seed(seed)
    model = GPT(gpt)
    model.train()
    optimizer = build_optimizer(model, train_cfg)
    return model, optimizer, lr_schedule(optimizer, train_cfg.model_copy(update={"max_steps": max_steps}))


def bare_optimizer_step(model, optimizer, schedule, grad_clip: float) -> None:
    """The bare loop's step once its micro-batches' gradients are in: clipping by torch, AdamW, the schedule."""
    import torch

    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def bare_train(train_cfg, seed: int, threads: int) -> dict:
    """`train_cfg` trained by a plain PyTorch loop in this process; returns {history, val_loss, seconds}.

    history: one entry per log window, as raylm's (step, loss = window mean, lr, step_time_s, tokens_per_s).
    val_loss: mean cross-entropy over the validation batches raylm evaluates (the split's first
    eval_batches micro-batches in file order), after the last step.
    """
    import torch

    from raylm.tokenize.shards import TokenSplit, read_token_meta
    from raylm.train.ingest import SequenceOrder
    from raylm.train.objectives import shift
    from raylm.train.trainer import model_config

    torch.set_num_threads(threads)
    meta = read_token_meta(train_cfg.data)
    model, optimizer, schedule = bare_model(train_cfg, model_config(train_cfg, meta), seed, train_cfg.max_steps)
    micro, accum = train_cfg.micro_batch_size, train_cfg.grad_accum_steps
    order = SequenceOrder(meta.num_sequences["train"], micro, 1, seed, train_cfg.shuffle)
    rows = TokenSplit(meta, "train")
    epoch_rows = functools.lru_cache(maxsize=2)(lambda e: order.epoch_indices(e, 0))  # (batches, micro)
    tokens_per_step = micro * accum * meta.seq_len
    history, losses, consumed = [], [], 0
    window_start, last_step = time.perf_counter(), 0
    started = time.perf_counter()
    for step in range(1, train_cfg.max_steps + 1):
        for _ in range(accum):
            epoch, b = divmod(consumed, order.batches_per_epoch)
            batch = torch.from_numpy(rows.rows(epoch_rows(epoch)[b]).astype(np.int64))  # (micro, seq_len + 1)
            consumed += 1
            _, loss = model(*shift(batch))
            (loss / accum).backward()  # DeepSpeed scales by 1 / accumulation steps too
            losses.append(loss.detach())
        bare_optimizer_step(model, optimizer, schedule, train_cfg.optimizer.grad_clip)
        if step % train_cfg.log_interval_steps == 0 or step == train_cfg.max_steps:
            seconds = time.perf_counter() - window_start
            steps = step - last_step
            history.append({
                "step": step, "loss": float(torch.stack(losses).mean()), "lr": schedule.get_last_lr()[0],
                "step_time_s": seconds / steps, "tokens_per_s": tokens_per_step * steps / seconds,
            })  # fmt: skip
            losses, last_step, window_start = [], step, time.perf_counter()
    seconds = time.perf_counter() - started
    return {"history": history, "val_loss": validation_loss(model, train_cfg, meta), "seconds": seconds}


def bare_train_process(config: Path | None, overrides: list[str], threads: int) -> dict:
    """bare_train on load_config(config, overrides) in a new Python process, whose environment adds what raylm's
    training workers get (raylm.train.trainer.worker_runtime_env: malloc settings only act from process start)."""
    return _in_worker_process({"run": "bare_train", "config": str(config) if config else None, "overrides": overrides,
                               "threads": threads})  # fmt: skip


def step_costs_process(config: Path | None, overrides: list[str], threads: int, blocks: int, steps: int) -> dict:
    """step_costs on load_config(config, overrides) in a new Python process with the environment of raylm's workers."""
    return _in_worker_process({"run": "step_costs", "config": str(config) if config else None, "overrides": overrides,
                               "threads": threads, "blocks": blocks, "steps": steps})  # fmt: skip


def _in_worker_process(job: dict) -> dict:
    """Run `job` (this module's __main__ below) in a new Python process with the environment of raylm's workers."""
    from raylm.config import load_config
    from raylm.train.worker_runtime import worker_runtime_env

    cfg = load_config(job["config"], job["overrides"])
    env = {**os.environ, **worker_runtime_env(cfg.train).get("env_vars", {})}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        subprocess.run([sys.executable, __file__, json.dumps(job), str(out)], env=env, check=True)
        return json.loads(out.read_text())


def step_costs(train_cfg, seed: int, threads: int, blocks: int, steps: int) -> dict:
    """Milliseconds of CPU and of wall time per optimizer step of three loops in this one process, without Ray, on
    the same micro-batches (the first rows of the train split), each starting from the same weights:

    - bare: the bare loop's step (bare_train's, clipping by torch);
    - deepspeed: DeepSpeed's engine built from raylm's config (one gloo rank), driven by forward, backward, step;
    - raylm: raylm's own micro-batch step around such an engine (raylm.train.step: timing, loss and gradient-norm
      bookkeeping, and a log window flushed every log_interval_steps steps, as the worker does).

    Blocks of `steps` steps run in turn, so the VM's drift reaches the three alike; medians over `blocks` blocks,
    after 3 warm-up steps each. Returns {loop: {"cpu_ms", "wall_ms"}}.
    """
    import socket

    import torch
    import torch.distributed as dist

    from raylm.tokenize.shards import TokenSplit, read_token_meta
    from raylm.train.deepspeed_config import deepspeed_config
    from raylm.train.objectives import shift
    from raylm.train.step import StepWindow, deepspeed_keeps_grad_norm, lm_loss, train_micro_batch
    from raylm.train.worker_runtime import extensions_dir
    from raylm.train.trainer import model_config

    torch.set_num_threads(threads)
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())  # the workers' build of DeepSpeed's comm op
    with socket.socket() as s:  # a free port for the one-rank process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    import deepspeed

    meta = read_token_meta(train_cfg.data)
    gpt = model_config(train_cfg, meta)
    micro, accum = train_cfg.micro_batch_size, train_cfg.grad_accum_steps
    rows = torch.from_numpy(TokenSplit(meta, "train").rows(np.arange(micro * accum)).astype(np.int64))
    batches = [shift(b) for b in rows.split(micro)]  # accum micro-batches of (inputs, targets)
    max_steps = (blocks + 1) * steps + 10

    def bare():
        model, optimizer, schedule = bare_model(train_cfg, gpt, seed, max_steps)

        def step():
            for inputs, targets in batches:
                _, loss = model(inputs, targets)
                (loss / accum).backward()
            bare_optimizer_step(model, optimizer, schedule, train_cfg.optimizer.grad_clip)

        return step

    def engine():
        model, optimizer, schedule = bare_model(train_cfg, gpt, seed, max_steps)
        config = deepspeed_config(train_cfg, data_parallel_size=1)
        return deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)

    def deepspeed_step():
        ds, *_ = engine()

        def step():
            for inputs, targets in batches:
                _, loss = ds(inputs, targets)
                ds.backward(loss)
                ds.step()

        return step

    def raylm_step():
        ds, _, _, schedule = engine()
        window = StepWindow(torch.device("cpu"), accum, own_grad_norm=not deepspeed_keeps_grad_norm(ds))
        done = [0]

        def step():
            for inputs, targets in batches:
                train_micro_batch(ds, lm_loss, inputs, targets, window)
            done[0] += 1
            if done[0] % train_cfg.log_interval_steps == 0:
                window.flush(schedule.get_last_lr()[0], micro * accum * meta.seq_len)

        return step

    loops = {"bare": bare(), "deepspeed": deepspeed_step(), "raylm": raylm_step()}
    for step in loops.values():
        for _ in range(3):
            step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    for _ in range(blocks):
        for name, step in loops.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append(((time.process_time() - cpu) / steps * 1e3, (time.perf_counter() - wall) / steps * 1e3))
    dist.destroy_process_group()
    return {
        name: {"cpu_ms": float(np.median([c for c, _ in t])), "wall_ms": float(np.median([w for _, w in t]))}
        for name, t in times.items()
    }


TRAINER_MARKS = ("RayTrainWorker", "train_common.py")
"""Command-line marks of a training process: a Ray Train worker (`ray::RayTrainWorker...`) or the bare loop's."""


def _process_ticks() -> tuple[int, int]:
    """CPU clock ticks (user + system, all threads) used so far by training processes and by every other process."""
    trainer = other = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:  # it ended while we looked
            continue
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        if any(mark in cmdline for mark in TRAINER_MARKS):
            trainer += ticks
        else:
            other += ticks
    return trainer, other


class CpuSampler:
    """Where the machine's CPU goes while a training run trains: the training process against all the others.

        with CpuSampler(threads=2) as cpu:
            run()
        cpu.result()   # {"trainer_cores": 1.81, "other_cores": 0.17, "seconds": 52.0}

    Samples every `interval` s (a thread reading /proc); the intervals that count are those in which
    the training processes used at least 3/4 of their `threads` cores (the training steps), less the
    first `skip` of them. Cores: CPU seconds per wall second. A process that starts and ends between
    two samples is missed (short Ray tasks are, in part).
    """

    def __init__(self, threads: int, interval: float = 1.0, skip: int = 5):
        self.threads, self.interval, self.skip = threads, interval, skip
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), *_process_ticks()))
            if self._stop.wait(self.interval):
                self.samples.append((time.perf_counter(), *_process_ticks()))
                return

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict | None:
        """Mean cores of the training processes and of the others over the counted intervals; None without any."""
        hz = os.sysconf("SC_CLK_TCK")
        steps = []
        for (t0, a0, b0), (t1, a1, b1) in zip(self.samples, self.samples[1:]):
            trainer, other = (a1 - a0) / hz, (b1 - b0) / hz
            if trainer / (t1 - t0) >= 0.75 * self.threads:
                steps.append((t1 - t0, trainer, other))
        steps = steps[self.skip :]
        if not steps:
            return None
        seconds = sum(s for s, _, _ in steps)
        return {
            "trainer_cores": sum(t for _, t, _ in steps) / seconds,
            "other_cores": sum(o for _, _, o in steps) / seconds,
            "seconds": seconds,
        }


def validation_loss(model, train_cfg, meta) -> float:
    """Mean next-token cross-entropy over the validation micro-batches raylm's loop evaluates on one worker
    (raylm.train.validation.ValidationSet of data-parallel rank 0 of 1)."""
    import torch

    from raylm.train.objectives import Objective
    from raylm.train.topology import rank_coords
    from raylm.train.validation import ValidationSet

    pairs = ValidationSet.read(train_cfg, meta, rank_coords(0, 1), torch.device("cpu")).pairs(Objective(), rank=0)
    model.eval()
    with torch.no_grad():
        losses = [float(model(inputs, targets)[1]) for inputs, targets in pairs]
    model.train()
    return float(np.mean(losses))


def steady_tokens_per_s(history: list[dict], skip_steps: int) -> float | None:
    """Tokens per second over the log windows that end after `skip_steps`: their tokens over their seconds.

    Each window's seconds are step_time_s x its steps, so evaluation and checkpoint time between
    windows is not counted. None when no window is left.
    """
    windows = [h for h in history if "tokens_per_s" in h]
    tokens = seconds = 0.0
    previous = 0
    for h in windows:
        steps = h["step"] - previous
        previous = h["step"]
        if h["step"] <= skip_steps:
            continue
        window_s = h["step_time_s"] * steps
        tokens += h["tokens_per_s"] * window_s
        seconds += window_s
    return tokens / seconds if seconds > 0 else None


def compare_curves(a: list[dict], b: list[dict], key: str = "loss") -> dict:
    """Two histories' `key` at the steps both logged: {steps, a, b, max_abs_diff, mean_abs_diff}."""
    av = {h["step"]: h[key] for h in a if key in h}
    bv = {h["step"]: h[key] for h in b if key in h}
    steps = sorted(av.keys() & bv.keys())
    if not steps:
        raise ValueError(f"the two histories share no step with {key!r}")
    diffs = np.abs(np.array([av[s] for s in steps]) - np.array([bv[s] for s in steps]))
    return {
        "steps": steps,
        "a": [av[s] for s in steps],
        "b": [bv[s] for s in steps],
        "max_abs_diff": float(diffs.max()),
        "mean_abs_diff": float(diffs.mean()),
    }


def sample_steps(steps: list[int], count: int) -> list[int]:
    """About `count` steps spread evenly over `steps`, always the first and the last."""
    if len(steps) <= count:
        return list(steps)
    picks = np.linspace(0, len(steps) - 1, count).round().astype(int)
    return [steps[i] for i in sorted(set(picks.tolist()))]


def plot_overlay(curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Training loss of several histories against step, overlaid, with the difference to the first below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=120, sharex=True, height_ratios=[3, 1])
    for name, style in zip(names, ("-", "--", ":")):
        points = [(h["step"], h["loss"]) for h in curves[name] if "loss" in h]
        top.plot(*zip(*points), style, label=name)
    for name in names[1:]:
        c = compare_curves(curves[names[0]], curves[name])
        bottom.plot(c["steps"], np.array(c["b"]) - np.array(c["a"]), label=f"{name} - {names[0]}")
    top.set_ylabel("training loss (nats/token)")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend()
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("difference")
    bottom.grid(alpha=0.3)
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


if __name__ == "__main__":  # _in_worker_process's child: python train_common.py JOB_JSON OUT_JSON
    from raylm.config import load_config

    job = json.loads(sys.argv[1])
    cfg = load_config(job["config"], job["overrides"])
    if job["run"] == "bare_train":
        result = bare_train(cfg.train, cfg.run.seed, job["threads"])
    else:
        result = step_costs(cfg.train, cfg.run.seed, job["threads"], job["blocks"], job["steps"])
    Path(sys.argv[2]).write_text(json.dumps(result))
