"""The tokenize stage: train (or load) a byte-level BPE, encode both splits, pack token shards.

    prepared/{train,validation}/*.parquet (id, text)
        ──Ray Data iter_batches──▶ BpeTrainer (driver), or tokenize.tokenizer   ──▶ tokens/tokenizer.json
        ──Ray Data: long documents cut into pieces, map_batches (actor pool, encode_batch)──▶ ids in input order
        ──tasks beside the blocks (shard_tasks): the driver lays each split's stream out, a task per shard
          cuts and writes its rows──▶ tokens/{train,validation}/part-NNNNN.npy
                                      tokens/doc_starts/{train,validation}.npy (driver)

Encoding runs in parallel with the input order preserved. The driver sees each encoded block's piece
lengths and document ends, never its tokens; every shard covers fixed positions of its split's stream,
so a task writes the same bytes one sequential packer would, whatever the number of actors, the block
sizes or the order the tasks finish in.

Input and output may be local paths or object-store URIs (raylm.storage): the read tasks open the
prepared Parquet files where they are, and the shard tasks write to the output where it is.

The format is shards.py's (version 2). Manifest stats: the TokenMeta fields, then per split
`documents`, `tokens` (separators included), `dropped_tokens` (the tail shorter than a row),
`shards` and `pieces` (rows encoded: documents plus the extra pieces of long ones); and
`tokenizer` (trained, or the path loaded), `tokenizer_documents`, `tokenizer_seconds`,
`encode_seconds`, `tokens_per_s` (tokens encoded and packed per second of the encode pass,
actor start-up included).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from raylm import storage
from raylm.artifacts import require_stage_output, stage_output
from raylm.context import RunContext
from raylm.errors import InputError
from raylm.tokenize.bpe import (
    TOKENIZER_FILE, check_vocab_size, eos_token_id, load_existing_tokenizer, train_tokenizer, vocab_size_of,
)
from raylm.tokenize.config import TokenizeConfig
from raylm.tokenize.encode import TEXT_COLUMN, EncodeDocuments, split_long_documents
from raylm.tokenize.shard_tasks import SplitShards, block_layouts
from raylm.tokenize.sft import run_sft_tokenize
from raylm.tokenize.shards import SPLITS, TokenMeta, token_dtype, vocab_hash

log = logging.getLogger(__name__)
TRAIN_BATCH_DOCS = 1024  # documents per batch streamed into the BPE trainer


def run_tokenize(tc: TokenizeConfig, ctx: RunContext) -> dict:
    """The tokenize stage: train the tokenizer, encode and pack both splits of `tc.input`; returns a JSON-able summary.

    With tokenize.format sft, encodes prompt/completion JSONL instead (raylm.tokenize.sft).
    """
    if tc.format == "sft":
        return run_sft_tokenize(tc, ctx)
    if tc.tokenizer is None:
        check_vocab_size(tc.vocab_size, tc.special_tokens)
    require_stage_output(tc.input, "prepare")
    inputs = {split: split_files(tc.input, split) for split in SPLITS}
    num_docs = {split: count_documents(files) for split, files in inputs.items()}
    for split, n in num_docs.items():
        if n == 0:
            raise InputError(
                f"{storage.join(tc.input, split)}: the {split} split has no documents"
                + (" (prepare.validation_fraction may be 0 or too small for this corpus)" if split == "validation" else "")
            )
    extra_inputs = [tc.tokenizer] if tc.tokenizer else []
    with stage_output(tc.output, "tokenize", tc, inputs=[tc.input, *extra_inputs], overwrite=ctx.overwrite) as out:
        if out.done:
            return _summary(out.path, out.manifest.get("stats", {}), reused=True)
        out.stats = _tokenize(tc, inputs, num_docs, out.tmp)  # the shards written by tasks, where the output is
    return _summary(out.path, out.stats, reused=False)


def split_files(root: str, split: str) -> list[str]:
    """Sorted Parquet files of one split of a prepare output (none when the split directory is absent)."""
    directory = storage.join(root, split)
    return [storage.join(directory, f.name) for f in storage.list_files(directory)
            if f.name.endswith(".parquet") and "/" not in f.name]  # fmt: skip


def _parquet_file(location: str) -> pq.ParquetFile:
    fs, inner = storage.filesystem(location)
    return pq.ParquetFile(inner, filesystem=fs)


def count_documents(files: list[str]) -> int:
    """Rows in these Parquet files, from their footers; an InputError names a file that is unreadable or has no text."""
    total = 0
    for f in files:
        try:
            meta = _parquet_file(f).metadata
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... on a bad file
            raise InputError(f"{f}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        schema = meta.schema.to_arrow_schema()
        if TEXT_COLUMN not in schema.names:
            raise InputError(f"{f}: no `{TEXT_COLUMN}` column (columns: {', '.join(schema.names)})")
        kind = schema.field(TEXT_COLUMN).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputError(f"{f}: column `{TEXT_COLUMN}` holds {kind}, expected strings")
        total += meta.num_rows
    return total


def read_texts(batch: dict, *, batch_rows: int, max_chars: int | None):
    """Ray Data UDF: rows naming Parquet files -> their `text` column in file order, in tables of batch_rows rows.

    With max_chars, long documents come out as pieces (encode.split_long_documents).
    """
    for path in batch["path"]:
        for record_batch in _parquet_file(str(path)).iter_batches(batch_size=batch_rows, columns=[TEXT_COLUMN]):
            table = pa.Table.from_batches([record_batch])
            yield split_long_documents(table, max_chars) if max_chars else table


def _ordered_texts(files: list[str], batch_rows: int, max_chars: int | None = None):
    """The text of these files as a Ray Dataset whose rows keep the files' order, one task per file.

    Not `read_parquet`: in Ray 2.60 it starts a pool of footer-reading actors on every call,
    seconds of fixed cost for files whose row counts are already known here.
    """
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))
    ds = ds.map_batches(read_texts, batch_size=1, fn_kwargs={"batch_rows": batch_rows, "max_chars": max_chars},
                        **storage.task_env(*files))  # fmt: skip
    # Set on this dataset's own copy of the DataContext: the global one, shared with other stages, stays as it is.
    ds.context.execution_options.preserve_order = True
    return ds


def _text_batches(tc: TokenizeConfig, files: list[str], counter: list[int]) -> Iterator[list[str]]:
    """Train-split documents for the BPE trainer, in order, at most tokenizer_sample_docs of them."""
    ds = _ordered_texts(files, TRAIN_BATCH_DOCS)
    if tc.tokenizer_sample_docs is not None:
        ds = ds.limit(tc.tokenizer_sample_docs)
    for batch in ds.iter_batches(batch_size=TRAIN_BATCH_DOCS, batch_format="pyarrow"):
        texts = batch.column(TEXT_COLUMN).fill_null("").to_pylist()
        counter[0] += len(texts)
        yield texts


def _encoded_dataset(tc: TokenizeConfig, files: list[str], tokenizer_json: str, eos_id: int, dtype: np.dtype):
    """Blocks of encoded pieces (`ids` list and `last` columns), in the order of `files` and of rows within them."""
    pieces = _ordered_texts(files, tc.batch_size, tc.max_piece_chars)
    # One block per batch, so every actor gets work even when a file yields a few large blocks.
    texts = pieces.repartition(target_num_rows_per_block=tc.batch_size)
    ds = texts.map_batches(
        EncodeDocuments,
        fn_constructor_kwargs={
            "tokenizer_json": tokenizer_json,
            "eos_id": eos_id,
            "dtype": dtype.name,
            "num_threads": tc.encode_cpus_per_actor,
        },
        batch_size=tc.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=encode_pool_size(tc, ray.cluster_resources().get("CPU", 0))),
        num_cpus=tc.encode_cpus_per_actor,
    )
    return ds


def encode_pool_size(tc: TokenizeConfig, cluster_cpus: float) -> int:
    """tokenize.encode_actors, or fewer on a cluster too small for them and a reading task: actors that hold
    every CPU would wait forever for the texts that no task could read."""
    fits = int((cluster_cpus - 1) // tc.encode_cpus_per_actor)
    if fits < tc.encode_actors:
        log.info("tokenize: %d encoding actor(s), not tokenize.encode_actors=%d: the cluster has %g CPUs",
                 max(1, fits), tc.encode_actors, cluster_cpus)
    return max(1, min(tc.encode_actors, fits))


def _encode_and_pack(
    tc: TokenizeConfig, inputs: dict[str, list[str]], num_docs: dict[str, int], tokenizer_json: str,
    eos_id: int, dtype: np.dtype, out: str,
) -> dict[str, dict]:
    """Encode every split in one ordered Ray Data pass (one actor pool) and pack each into its shards at `out`,
    written by tasks (shard_tasks.SplitShards) while the driver lays the streams out.

    The splits' files are read one split after the other, so the first num_docs["train"] encoded
    documents are the train split and the rest validation: blocks are routed by document count.
    """
    writers = {split: SplitShards(out, split, num_docs[split], tc.seq_len, tc.shard_rows, dtype) for split in SPLITS}
    files = [f for split in SPLITS for f in inputs[split]]
    bounds = np.cumsum([0] + [num_docs[split] for split in SPLITS])
    ranges = {split: (bounds[i], bounds[i + 1]) for i, split in enumerate(SPLITS)}  # document indices of each split
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"), TimeElapsedColumn())
    seen = 0  # documents routed so far; a block's rows are pieces, and a document's last piece counts it
    console = Console(stderr=True)
    tenths = {split: 0 for split in SPLITS}  # not in a terminal (a log): a line per tenth of a split, not a bar
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        tasks = {split: progress.add_task(f"encode + pack {split}", total=num_docs[split]) for split in SPLITS}
        bundles = _encoded_dataset(tc, files, tokenizer_json, eos_id, dtype).iter_internal_ref_bundles()
        for block, lengths, last in block_layouts(bundles):
            for lo, hi, split in _route(last, seen, ranges):
                before = writers[split].documents
                writers[split].add(block, lengths, last, lo, hi)
                progress.update(tasks[split], advance=writers[split].documents - before)
                done = writers[split].documents * 10 // num_docs[split]
                if not console.is_terminal and done > tenths[split]:
                    tenths[split] = done
                    log.info("[raylm] tokenize: encode + pack %s: %d/%d documents", split,
                             writers[split].documents, num_docs[split])  # fmt: skip
            seen += int(np.count_nonzero(last))
    if seen != bounds[-1] or any(w.documents != num_docs[s] for s, w in writers.items()):
        raise InputError(f"{tc.input}: changed while being read ({bounds[-1]} documents expected, {seen} read)")
    counts = {split: writer.close() for split, writer in writers.items()}
    for split, c in counts.items():
        if c["sequences"] == 0:
            raise InputError(
                f"{storage.join(tc.input, split)}: the {split} split's {c['documents']} documents hold {c['tokens']} tokens, "
                f"too few for one sequence of tokenize.seq_len + 1 = {tc.seq_len + 1}; lower seq_len or add documents"
            )
    return counts


def _route(last: np.ndarray, seen: int, ranges: dict[str, tuple[int, int]]):
    """(first piece, end piece, split) parts of a block of pieces (`last`: which end a document) whose first piece
    belongs to document number `seen`.

    A document's pieces all belong to its split; split boundaries fall after a document's last piece.
    """
    doc_of_row = seen + np.concatenate([[0], np.cumsum(last)[:-1]])  # document number of every piece
    for split, (lo, hi) in ranges.items():
        rows = np.flatnonzero((doc_of_row >= lo) & (doc_of_row < hi))
        if len(rows):
            yield int(rows[0]), int(rows[-1]) + 1, split


def _tokenize(tc: TokenizeConfig, inputs: dict[str, list[str]], num_docs: dict[str, int], out: str) -> dict:
    """The stage's work, writing into the stage's output location `out` (its temporary directory on a disk, the
    output prefix on an object store); returns the manifest stats."""
    t0 = time.perf_counter()
    trained_on = [0]
    if tc.tokenizer is not None:
        tokenizer = load_existing_tokenizer(tc.tokenizer, tc.special_tokens)
    else:
        sample = min(num_docs["train"], tc.tokenizer_sample_docs or num_docs["train"])
        tokenizer = train_tokenizer(
            _text_batches(tc, inputs["train"], trained_on),
            vocab_size=tc.vocab_size,
            min_frequency=tc.min_frequency,
            special_tokens=tc.special_tokens,
            num_documents=sample,
        )
    tokenizer_json = tokenizer.to_str(pretty=True)  # what Tokenizer.save writes
    storage.write_text(storage.join(out, TOKENIZER_FILE), tokenizer_json)
    tokenizer_s = time.perf_counter() - t0
    vocab_size = vocab_size_of(tokenizer)
    eos_id = eos_token_id(tokenizer, tc.special_tokens)
    dtype = token_dtype(vocab_size)

    t1 = time.perf_counter()
    counts = _encode_and_pack(tc, inputs, num_docs, tokenizer_json, eos_id, dtype, out)
    encode_s = time.perf_counter() - t1
    total_tokens = sum(c["tokens"] for c in counts.values())

    meta = TokenMeta(
        path=Path(out), vocab_size=vocab_size, seq_len=tc.seq_len, eos_token_id=eos_id, dtype=dtype.name,
        num_sequences={s: counts[s]["sequences"] for s in SPLITS}, vocab_hash=vocab_hash(tokenizer_json),
    )
    per_split = lambda key: {s: counts[s][key] for s in SPLITS}  # noqa: E731
    return meta.to_stats() | {
        "documents": per_split("documents"),
        "tokens": per_split("tokens"),
        "dropped_tokens": per_split("dropped_tokens"),
        "shards": per_split("shards"),
        "pieces": per_split("pieces"),
        "tokenizer": str(tc.tokenizer) if tc.tokenizer else "trained",
        "tokenizer_documents": trained_on[0],
        "tokenizer_seconds": round(tokenizer_s, 3),
        "encode_seconds": round(encode_s, 3),
        "tokens_per_s": round(total_tokens / encode_s, 1) if encode_s > 0 else None,
    }


def _summary(path: str, stats: dict, reused: bool) -> dict:
    return {"output": str(path), "reused": reused, **stats}
