"""The evaluate stage: every configured model scored on the same validation tokens and timed the same way.

    raylm evaluate --config configs/demo.yaml [--evaluate.max_batches=50]

For each `evaluate.models` entry (name -> exported model directory) a Ray task, reserving
`num_threads` CPUs (and a GPU when device=cuda), loads the model and measures:

- validation loss (mean next-token cross-entropy in nats), perplexity and bits per byte on
  the first max_batches × batch_size sequences of the tokenize output's validation split;
- parameters and size on disk of model.safetensors;
- tokens/s of greedy decoding with a KV cache at batch 1 (speed_new_tokens after a prompt of
  speed_prompt_tokens validation tokens; one warm-up, median of speed_repeats runs).

Tasks run one after another so that no two models compete for the cores while being timed.
Writes `results.json` (every figure, per model) and `table.txt` (the table printed at the end)
under `evaluate.output`.
"""

from __future__ import annotations

import io
import os

import numpy as np
import ray
import torch
from rich import box
from rich.console import Console
from rich.table import Table

from raylm import storage
from raylm.artifacts import stage_output
from raylm.context import RunContext
from raylm.errors import ConfigError, InputError, RaylmError
from raylm.evaluate.config import EvaluateConfig
from raylm.evaluate.perplexity import perplexity_metrics, sum_cross_entropy
from raylm.train.metrics import target_bytes
from raylm.evaluate.speed import decode_speed
from raylm.model.artifact import TOKENIZER, WEIGHTS, load_model, read_model_meta
from raylm.model.gpt import GPTConfig
from raylm.model.quantized import count_parameters
from raylm.tokenize.shards import TokenMeta, check_same_tokenizer, read_split_numpy, read_token_meta

RESULTS, TABLE = "results.json", "table.txt"


def check_inputs(ecfg: EvaluateConfig) -> TokenMeta:
    """Fail before any work when the data or a model is missing or cannot be scored on this data."""
    meta = read_token_meta(ecfg.data)
    if meta.num_sequences.get("validation", 0) < 1:
        raise InputError(f"{meta.split_dir('validation')}: no validation sequences to score")
    speed_tokens = ecfg.speed_prompt_tokens + ecfg.speed_new_tokens
    for name, path in ecfg.models.items():
        p = str(path)
        if not storage.exists(p):
            raise InputError(f"{p}: model {name!r} (evaluate.models.{name}) not found")
        cfg = GPTConfig.from_dict(read_model_meta(p)["model"])
        if not storage.is_file(storage.join(p, WEIGHTS)):
            raise InputError(f"{p}: model {name!r} has no {WEIGHTS}")
        if cfg.attention != "causal":
            raise InputError(
                f"{p}: model {name!r} is a masked-language model (bidirectional attention): it has no next-token "
                "perplexity or generation speed to evaluate; its training metrics hold its masked-LM loss"
            )
        if meta.seq_len > cfg.block_size:
            raise InputError(f"{p}: model {name!r} attends over {cfg.block_size} tokens, the data's sequences have {meta.seq_len}")
        check_same_tokenizer(meta, storage.join(p, TOKENIZER), f"model {name!r}")
        if speed_tokens > cfg.block_size:
            raise ConfigError(
                f"evaluate.speed_prompt_tokens + evaluate.speed_new_tokens = {speed_tokens} exceeds "
                f"model {name!r}'s context of {cfg.block_size} tokens"
            )
    return meta


def speed_prompt(sequences: np.ndarray, num_tokens: int) -> list[int]:
    """The first `num_tokens` tokens of the validation text (rows overlap by one token)."""
    stream = np.concatenate([sequences[0], sequences[1:, 1:].reshape(-1)])
    if len(stream) < num_tokens:
        raise InputError(f"the validation rows scored hold {len(stream)} tokens, fewer than speed_prompt_tokens={num_tokens}")
    return stream[:num_tokens].tolist()


def evaluate_model(name: str, path: str, ecfg: EvaluateConfig) -> dict:
    """Every figure of one model's row (runs in a Ray task; usable without Ray)."""
    torch.set_num_threads(ecfg.num_threads)
    loaded = load_model(path)
    quantization = (loaded.meta.get("quantization") or {}).get("method")
    # int8 kernels are CPU-only; float models go where the config says.
    device = "cpu" if quantization or ecfg.device == "cpu" else "cuda"
    model = loaded.model.to(device)
    sequences = read_split_numpy(read_token_meta(ecfg.data), "validation", max_rows=ecfg.max_batches * ecfg.batch_size)
    nats, tokens = sum_cross_entropy(model, sequences, ecfg.batch_size, device)
    speed = decode_speed(
        model, speed_prompt(sequences, ecfg.speed_prompt_tokens), ecfg.speed_new_tokens, ecfg.speed_repeats, device
    )
    size = (loaded.path / WEIGHTS).stat().st_size
    return {
        "name": name,
        "path": str(path),
        "quantization": quantization,
        "device": device,
        "num_threads": ecfg.num_threads,
        "params": count_parameters(loaded.model),
        "size_bytes": size,
        "size_mb": size / 1e6,
        **perplexity_metrics(nats, tokens, target_bytes(loaded.tokenizer, sequences)),
        **speed,
    }


def add_relative(rows: list[dict]) -> list[dict]:
    """Speed and perplexity of each row relative to the first (the baseline)."""
    base = rows[0]
    for row in rows:
        row["speed_vs_first"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["ppl_vs_first"] = row["ppl"] / base["ppl"]
    return rows


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def results_table(rows: list[dict]) -> Table:
    """The rows as a rich Table (also rendered to plain fixed-width text for table.txt)."""
    table = Table(box=box.SIMPLE_HEAD, title="raylm evaluate", title_justify="left")
    for header in ("model", "params", "size MB", "val loss", "ppl", "bits/byte", "tokens/s", "speed ×", "ppl ×"):
        table.add_column(header, justify="left" if header == "model" else "right")
    for r in rows:
        name = r["name"] + (f" ({r['quantization']}, {r['device']})" if r["quantization"] else "")
        bpb = f"{r['bits_per_byte']:.3f}" if "bits_per_byte" in r else "-"
        table.add_row(
            name,
            _human(r["params"]),
            f"{r['size_mb']:.2f}",
            f"{r['val_loss']:.4f}",
            f"{r['ppl']:.2f}",
            bpb,
            f"{r['tokens_per_s']:.1f}",
            f"{r['speed_vs_first']:.2f}",
            f"{r['ppl_vs_first']:.3f}",
        )
    return table


def table_text(table: Table, caption: str) -> str:
    """Plain fixed-width text of a rich Table, no colours."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None, force_terminal=False)
    console.print(table)
    console.print(caption, highlight=False)
    return "\n".join(line.rstrip() for line in buffer.getvalue().strip("\n").splitlines()) + "\n"


def _caption(ecfg: EvaluateConfig, rows: list[dict]) -> str:
    first = rows[0]
    return (
        f"{first['val_tokens']} validation tokens per model; tokens/s: greedy, KV cache, batch 1, "
        f"{ecfg.speed_new_tokens} new after {ecfg.speed_prompt_tokens} prompt tokens, threads: {ecfg.num_threads}, "
        f"median of {ecfg.speed_repeats}; × columns relative to {first['name']}."
    )


def run_evaluate(ecfg: EvaluateConfig, ctx: RunContext) -> dict:
    """The evaluate stage: score every model of `ecfg.models`; write results.json and table.txt; return a summary."""
    if not ecfg.models:
        raise ConfigError("evaluate.models: no models to evaluate")
    check_inputs(ecfg)
    cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    if ecfg.num_threads > cpus:
        raise ConfigError(f"evaluate.num_threads: {ecfg.num_threads} exceeds the {cpus:g} CPUs of the largest Ray node")
    console = Console()
    inputs = [ecfg.data, *ecfg.models.values()]
    with stage_output(ecfg.output, "evaluate", ecfg, inputs=inputs, overwrite=ctx.overwrite) as out:
        if out.done:
            console.print(storage.read_text(storage.join(out.path, TABLE)).rstrip(), markup=False, highlight=False)
            return _summary(out.path, out.manifest.get("stats", {}))
        rows = add_relative([_run_task(name, path, ecfg, console) for name, path in ecfg.models.items()])
        caption = _caption(ecfg, rows)
        table = results_table(rows)
        out.write_json(RESULTS, {"data": ecfg.data, "split": "validation", "note": caption, "models": rows})
        out.write_text(TABLE, table_text(table, caption))
        out.stats = {
            "models": {r["name"]: {k: r[k] for k in ("ppl", "val_loss", "tokens_per_s", "size_bytes")} for r in rows}
        }
    wide = Console(width=max(console.width, 120))  # a narrow terminal would squeeze the columns into stubs
    wide.print(table)
    wide.print(caption, highlight=False)
    return _summary(out.path, out.stats)


def _summary(path: str, stats: dict) -> dict:
    return {"output": path, "results": storage.join(path, RESULTS), "table": storage.join(path, TABLE), **stats}


def _run_task(name: str, path: str, ecfg: EvaluateConfig, console: Console) -> dict:
    """One model's row from a Ray task; waits for it, so the next model is timed on idle cores."""
    gpus = 1 if ecfg.device == "cuda" and not read_model_meta(path).get("quantization") else 0
    task = ray.remote(evaluate_model).options(num_cpus=ecfg.num_threads, num_gpus=gpus, name=f"evaluate:{name}",
                                              **storage.task_env(ecfg.data, path))  # fmt: skip
    with console.status(f"evaluating {name} ({path})"):
        try:
            row = ray.get(task.remote(name, os.fspath(path), ecfg))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RaylmError):
                raise e.cause from None
            raise
    console.print(f"[green]{name}[/]: ppl {row['ppl']:.2f}, {row['tokens_per_s']:.1f} tokens/s")
    return row
