"""Supervised fine-tuning data: prompt/completion JSONL -> padded token rows with a loss mask (tokenize.format: sft).

    {"prompt": "Q: what is 2+3? A:", "completion": " 5"}        one record per line

Each example becomes one row of seq_len + 1 ids, prompt + completion + end-of-text, padded
with end-of-text ids, and a loss mask of the same shape:

    ids   p0 p1 p2 p3 c0 c1 eos eos eos ...
    mask   0  0  0  0  1  1  1   0   0  ...     1: the id is a training target

The train stage shifts rows into inputs row[:-1] and targets row[1:], and a target whose
mask is 0 becomes -100, which the GPT's cross-entropy ignores (raylm.train.objectives.masked_targets): the model
learns to produce the completion and to stop, never to predict the prompt. Prompt and
completion are encoded separately, so the boundary is exact and a prompt encoded at inference
is the prompt the model was trained on.

The output is the token format of shards.py (version 2) with `loss_mask/` beside the shards,
made with the base model's tokenizer (tokenize.tokenizer), so `read_token_meta` and the vocab
check of the train stage apply unchanged. Examples are split into train and validation by a
seeded hash of their text (raylm.data.split), the same on every run whatever the line order.
SFT sets are small next to pretraining corpora: they are read and encoded on the driver
(`encode_batch` runs on all cores); the rows are held in memory ((seq_len + 1) ids each).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from raylm import storage
from raylm.artifacts import stage_output
from raylm.context import RunContext
from raylm.data.sources import resolve_input
from raylm.data.split import split_of
from raylm.errors import InputError, first_line
from raylm.tokenize.bpe import eos_token_id, load_existing_tokenizer
from raylm.tokenize.config import SftDataConfig, TokenizeConfig
from raylm.tokenize.shards import SPLITS, token_dtype, write_token_data

log = logging.getLogger(__name__)
ENCODE_BATCH = 1024  # examples per encode_batch call
BAD_LINES_KEPT = 20  # locations of skipped lines kept in the manifest


@dataclass
class SftCounts:
    """What happened to the input's lines, for the manifest."""

    examples: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    prompt_tokens: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    target_tokens: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    truncated_prompts: int = 0
    dropped_too_long: int = 0
    skipped_bad_lines: int = 0
    bad_lines: list[str] = field(default_factory=list)

    def to_stats(self) -> dict:
        return {
            "examples": dict(self.examples),
            "prompt_tokens": dict(self.prompt_tokens),
            "target_tokens": dict(self.target_tokens),
            "truncated_prompts": self.truncated_prompts,
            "dropped_too_long": self.dropped_too_long,
            "skipped_bad_lines": self.skipped_bad_lines,
            "bad_lines": list(self.bad_lines),
        }


def input_files(path: str) -> list[str]:
    """The JSONL file itself, or the sorted *.jsonl files of a directory or prefix (`package:sft_demo`: the
    bundled examples); local or on an object store."""
    p = resolve_input(path)
    if storage.is_file(p):
        return [p]
    if storage.exists(p):
        files = [storage.join(p, f.name) for f in storage.list_files(p) if f.name.endswith(".jsonl") and "/" not in f.name]
        if files:
            return files
        raise InputError(f"{p}: no *.jsonl files (tokenize.input, format sft)")
    raise InputError(f"{p}: not found (tokenize.input, format sft: a JSONL file or a directory of them)")


def parse_record(line: str, where: str, sc: SftDataConfig) -> tuple[str, str]:
    """(prompt, completion) of one JSONL line; InputError naming `where` (file:line) and what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with {sc.prompt_field!r} and {sc.completion_field!r}")
    values = []
    for key in (sc.prompt_field, sc.completion_field):
        value = record.get(key)
        if not isinstance(value, str) or not value:
            got = "missing" if key not in record else f"{type(value).__name__} {value!r}"[:60]
            raise InputError(f"{where}: {key!r} must be a non-empty string, got {got} (tokenize.sft.{_field_key(key, sc)})")
        values.append(value)
    return values[0], values[1]


def _field_key(key: str, sc: SftDataConfig) -> str:
    return "prompt_field" if key == sc.prompt_field else "completion_field"


def read_records(files: list[str], sc: SftDataConfig, counts: SftCounts) -> Iterator[tuple[str, str, str]]:
    """(file:line, prompt, completion) of every good record; bad lines raise or are counted (sft.on_error)."""
    for f in files:
        try:
            handle = storage.open_input(f)
        except OSError as e:
            raise InputError(f"{f}: cannot read ({e.strerror or first_line(e)})") from None
        with handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{f}:{number}"
                if not raw.strip():
                    continue
                try:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise InputError(f"{where}: not valid UTF-8") from None
                    prompt, completion = parse_record(line, where, sc)
                except InputError as e:
                    if sc.on_error == "error":
                        raise
                    counts.skipped_bad_lines += 1
                    if len(counts.bad_lines) < BAD_LINES_KEPT:
                        counts.bad_lines.append(str(e))
                    continue
                yield where, prompt, completion


def example_row(
    prompt: list[int], completion: list[int], eos_id: int, seq_len: int, too_long: str, where: str = ""
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(ids (seq_len + 1,), loss mask (seq_len + 1,), prompt truncated?) of one example; None when it is dropped.

    The prompt keeps its last tokens when truncated; at least one of them stays, since
    the first id of a row is never a target.
    """
    width = seq_len + 1
    truncated = False
    need = len(prompt) + len(completion) + 1
    if need > width:
        keep = width - len(completion) - 1
        if too_long == "error":
            raise InputError(
                f"{where}: example of {need} tokens (prompt {len(prompt)}, completion {len(completion)}, end-of-text 1) "
                f"exceeds a row of tokenize.seq_len + 1 = {width} (tokenize.sft.too_long: truncate_prompt or drop)"
            )
        if too_long == "drop" or keep < 1:
            return None
        prompt, truncated = prompt[-keep:], True
    ids = np.full(width, eos_id, dtype=np.int64)  # padding: end-of-text ids, never targets
    mask = np.zeros(width, dtype=np.uint8)
    n = len(prompt) + len(completion) + 1
    ids[:n] = prompt + completion + [eos_id]
    mask[len(prompt) : n] = 1
    return ids, mask, truncated


def encode_examples(
    records: Iterator[tuple[str, str, str]], tokenizer, eos_id: int, seq_len: int, sc: SftDataConfig, seed: int,
    counts: SftCounts,
) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """split -> (rows, masks) of every example, in input order within each split."""
    out = {s: ([], []) for s in SPLITS}

    def flush(batch: list[tuple[str, str, str]]) -> None:
        prompts = tokenizer.encode_batch([p for _, p, _ in batch], add_special_tokens=False)
        completions = tokenizer.encode_batch([c for _, _, c in batch], add_special_tokens=False)
        for (where, prompt, completion), p, c in zip(batch, prompts, completions):
            made = example_row(list(p.ids), list(c.ids), eos_id, seq_len, sc.too_long, where)
            if made is None:
                counts.dropped_too_long += 1
                continue
            ids, mask, truncated = made
            split = split_of(f"{prompt}\x00{completion}", seed, sc.validation_fraction)
            out[split][0].append(ids)
            out[split][1].append(mask)
            counts.examples[split] += 1
            counts.target_tokens[split] += int(mask.sum())
            counts.prompt_tokens[split] += int(np.argmax(mask))  # the prompt ends where the mask starts
            counts.truncated_prompts += truncated

    batch: list[tuple[str, str, str]] = []
    for record in records:
        batch.append(record)
        if len(batch) == ENCODE_BATCH:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return out


def run_sft_tokenize(tc: TokenizeConfig, ctx: RunContext) -> dict:
    """The tokenize stage for format sft: encode `tc.input` with `tc.tokenizer`; returns a summary."""
    files = input_files(tc.input)
    config = {**json.loads(tc.model_dump_json()), "seed": ctx.seed}  # the split depends on the seed
    with stage_output(tc.output, "tokenize", config, inputs=[tc.input, tc.tokenizer], overwrite=ctx.overwrite) as out:
        if out.done:
            return {"output": out.path, "reused": True, **out.manifest.get("stats", {})}
        with storage.local_dir(out.tmp) as local:  # on an object store: written locally, then uploaded
            out.stats = write_sft_data(tc, files, local, ctx.seed)
    return {"output": out.path, "reused": False, **out.stats}


def write_sft_data(tc: TokenizeConfig, files: list[str], out: Path, seed: int) -> dict:
    """Encode and write the SFT token data into directory `out`; returns the manifest stats."""
    tokenizer = load_existing_tokenizer(tc.tokenizer, tc.special_tokens)
    eos_id = eos_token_id(tokenizer, tc.special_tokens)
    counts = SftCounts()
    rows = encode_examples(read_records(files, tc.sft, counts), tokenizer, eos_id, tc.seq_len, tc.sft, seed, counts)
    for split in SPLITS:
        if not rows[split][0]:
            hint = " (raise tokenize.sft.validation_fraction or add examples)" if split == "validation" else ""
            raise InputError(f"{tc.input}: no {split} examples among {sum(counts.examples.values())} usable ones{hint}")
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    splits, masks = {}, {}
    for split, (ids, mask) in rows.items():
        stacked = np.stack(ids).astype(dtype)
        # every example starts a document at column 0 of its row (stream position row * seq_len)
        splits[split] = (stacked, np.arange(len(ids), dtype=np.int64) * tc.seq_len)
        masks[split] = np.stack(mask)
    meta = write_token_data(out, tokenizer, eos_id, splits, shard_rows=tc.shard_rows, loss_masks=masks)
    stats = counts.to_stats()
    log.info(
        f"[raylm] sft data: {stats['examples']} examples, {stats['truncated_prompts']} prompts truncated, "
        f"{stats['dropped_too_long']} too long dropped, {stats['skipped_bad_lines']} bad lines skipped"
    )
    return meta.to_stats() | {"format": "sft", "tokenizer": str(tc.tokenizer), **stats}
