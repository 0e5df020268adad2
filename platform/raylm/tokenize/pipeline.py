"""The tokenize stage: train a byte-level BPE on the train split, encode both splits, pack token shards.

    prepared/{train,validation}/*.parquet (id, text)
        ──Ray Data iter_batches──▶ BpeTrainer (driver)              ──▶ tokens/tokenizer.json
        ──Ray Data map_batches (actor pool, encode_batch)──▶ ids in input order
        ──driver: SequencePacker + RowBatcher──▶ tokens/{train,validation}/part-NNNNN.parquet

Encoding runs in parallel with the input order preserved, and one streaming packer on the
driver cuts the ordered stream into rows, so the shards are the same bytes on every run,
whatever the number of actors or the block sizes.

Manifest stats: the TokenMeta fields (shards.py), then per split `documents`, `tokens`
(separators included), `dropped_tokens` (the tail shorter than a row) and `shards`; and
`tokenizer_documents`, `tokenizer_seconds`, `encode_seconds`, `tokens_per_s` (tokens encoded
and packed per second of the encode pass, actor start-up included).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from raylm.artifacts import require_stage_output, stage_output
from raylm.config import RaylmConfig
from raylm.errors import InputError
from raylm.tokenize.bpe import TOKENIZER_FILE, check_vocab_size, eos_token_id, train_tokenizer
from raylm.tokenize.config import TokenizeConfig
from raylm.tokenize.encode import TEXT_COLUMN, EncodeDocuments, block_stream
from raylm.tokenize.packing import RowBatcher, SequencePacker
from raylm.tokenize.shards import SPLITS, TokenMeta, token_dtype, write_token_shard

log = logging.getLogger(__name__)
TRAIN_BATCH_DOCS = 1024  # documents per batch streamed into the BPE trainer


def run_tokenize(cfg: RaylmConfig) -> dict:
    """Train the tokenizer, encode and pack both splits of `cfg.tokenize.input`; returns a JSON-able summary."""
    tc = cfg.tokenize
    check_vocab_size(tc.vocab_size, tc.special_tokens)
    require_stage_output(tc.input, "prepare")
    inputs = {split: split_files(tc.input, split) for split in SPLITS}
    num_docs = {split: count_documents(files) for split, files in inputs.items()}
    if num_docs["train"] == 0:
        raise InputError(f"{Path(tc.input) / 'train'}: the train split has no documents")
    with stage_output(tc.output, "tokenize", tc, inputs=[tc.input], overwrite=cfg.run.overwrite) as out:
        if out.done:
            return _summary(out.path, out.manifest.get("stats", {}), reused=True)
        _ensure_ray(cfg)
        out.stats = _tokenize(tc, inputs, num_docs, out.tmp)
    return _summary(out.path, out.stats, reused=False)


def split_files(root: str, split: str) -> list[str]:
    """Sorted Parquet files of one split of a prepare output (none when the split directory is absent)."""
    return sorted(str(f) for f in (Path(root) / split).glob("*.parquet"))


def count_documents(files: list[str]) -> int:
    """Rows in these Parquet files, from their footers; an InputError names a file that is unreadable or has no text."""
    total = 0
    for f in files:
        try:
            meta = pq.ParquetFile(f).metadata
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


def _ensure_ray(cfg: RaylmConfig) -> None:
    import ray

    if not ray.is_initialized():
        from raylm.runtime import init_ray

        init_ray(cfg.ray.address, cfg.ray.num_cpus)


def _ordered_texts(files: list[str]):
    """The text column of these files as a Ray Dataset whose rows keep the files' order."""
    import ray

    ds = ray.data.read_parquet(files).select_columns([TEXT_COLUMN])
    # Set on this dataset's own copy of the DataContext: the global one, shared with other stages, stays as it is.
    ds.context.execution_options.preserve_order = True
    return ds


def _text_batches(tc: TokenizeConfig, files: list[str], counter: list[int]) -> Iterator[list[str]]:
    """Train-split documents for the BPE trainer, in order, at most tokenizer_sample_docs of them."""
    ds = _ordered_texts(files)
    if tc.tokenizer_sample_docs is not None:
        ds = ds.limit(tc.tokenizer_sample_docs)
    for batch in ds.iter_batches(batch_size=TRAIN_BATCH_DOCS, batch_format="pyarrow"):
        texts = batch.column(TEXT_COLUMN).fill_null("").to_pylist()
        counter[0] += len(texts)
        yield texts


def _encoded_blocks(tc: TokenizeConfig, files: list[str], tokenizer_json: str, eos_id: int, dtype: np.dtype):
    """Blocks of encoded documents (an `ids` list column), in the order of `files` and of rows within them."""
    import ray

    # One block per batch, so every actor gets work even when the read yields a few large blocks.
    texts = _ordered_texts(files).repartition(target_num_rows_per_block=tc.batch_size)
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
        compute=ray.data.ActorPoolStrategy(size=tc.encode_actors),
        num_cpus=tc.encode_cpus_per_actor,
    )
    return ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


class SplitWriter:
    """Packs one split's token stream and writes its shards as part-00000.parquet, part-00001.parquet, ..."""

    def __init__(self, out_dir: Path, seq_len: int, shard_rows: int, dtype: np.dtype):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.packer = SequencePacker(seq_len, dtype)
        self.batcher = RowBatcher(shard_rows, seq_len + 1, dtype)
        self.documents = 0
        self.shards = 0

    def add(self, block: pa.Table) -> None:
        """Pack a block of encoded documents; write every shard it completes."""
        self.documents += block.num_rows
        for rows in self.batcher.add(self.packer.add(block_stream(block))):
            self._write(rows)

    def close(self) -> dict:
        """Write the last, short shard; return the split's counts."""
        for rows in self.batcher.flush():
            self._write(rows)
        return {
            "documents": self.documents,
            "tokens": self.packer.tokens_in,
            "sequences": self.packer.rows_out,
            "dropped_tokens": self.packer.dropped_tokens,
            "shards": self.shards,
        }

    def _write(self, rows: np.ndarray) -> None:
        write_token_shard(self.out_dir / f"part-{self.shards:05d}.parquet", rows)
        self.shards += 1


def _encode_and_pack(
    tc: TokenizeConfig, inputs: dict[str, list[str]], num_docs: dict[str, int], tokenizer_json: str,
    eos_id: int, dtype: np.dtype, out: Path,
) -> dict[str, dict]:
    """Encode every split in one ordered Ray Data pass (one actor pool) and pack each into its shards.

    The splits' files are read one split after the other, so the first num_docs["train"] encoded
    documents are the train split and the rest validation: blocks are routed by document count.
    """
    writers = {split: SplitWriter(out / split, tc.seq_len, tc.shard_rows, dtype) for split in SPLITS}
    files = [f for split in SPLITS for f in inputs[split]]
    bounds = np.cumsum([0] + [num_docs[split] for split in SPLITS])
    ranges = {split: (bounds[i], bounds[i + 1]) for i, split in enumerate(SPLITS)}  # document indices of each split
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"), TimeElapsedColumn())
    seen = 0
    with Progress(*columns, console=Console(stderr=True)) as progress:
        tasks = {split: progress.add_task(f"encode + pack {split}", total=num_docs[split]) for split in SPLITS}
        for block in _encoded_blocks(tc, files, tokenizer_json, eos_id, dtype):
            for split, (lo, hi) in ranges.items():
                first, end = max(lo, seen), min(hi, seen + block.num_rows)
                if first < end:
                    writers[split].add(block.slice(first - seen, end - first))
                    progress.update(tasks[split], advance=end - first)
            seen += block.num_rows
    if seen != bounds[-1]:
        raise InputError(f"{tc.input}: changed while being read ({bounds[-1]} documents expected, {seen} read)")
    counts = {split: writer.close() for split, writer in writers.items()}
    for split, c in counts.items():
        if c["sequences"] == 0:
            log.warning("tokenize: the %s split (%d documents, %d tokens) fills no sequence of %d tokens",
                        split, c["documents"], c["tokens"], tc.seq_len + 1)
    return counts


def _tokenize(tc: TokenizeConfig, inputs: dict[str, list[str]], num_docs: dict[str, int], out: Path) -> dict:
    """The stage's work, writing into the temporary output directory `out`; returns the manifest stats."""
    t0 = time.perf_counter()
    trained_on = [0]
    sample = min(num_docs["train"], tc.tokenizer_sample_docs or num_docs["train"])
    tokenizer = train_tokenizer(
        _text_batches(tc, inputs["train"], trained_on),
        vocab_size=tc.vocab_size,
        min_frequency=tc.min_frequency,
        special_tokens=tc.special_tokens,
        num_documents=sample,
    )
    tokenizer.save(str(out / TOKENIZER_FILE))
    tokenizer_s = time.perf_counter() - t0
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eos_id = eos_token_id(tokenizer, tc.special_tokens)
    dtype = token_dtype(vocab_size)
    tokenizer_json = tokenizer.to_str()

    t1 = time.perf_counter()
    counts = _encode_and_pack(tc, inputs, num_docs, tokenizer_json, eos_id, dtype, out)
    encode_s = time.perf_counter() - t1
    total_tokens = sum(c["tokens"] for c in counts.values())

    meta = TokenMeta(
        path=out, vocab_size=vocab_size, seq_len=tc.seq_len, eos_token_id=eos_id, dtype=dtype.name,
        num_sequences={s: counts[s]["sequences"] for s in SPLITS},
    )
    per_split = lambda key: {s: counts[s][key] for s in SPLITS}  # noqa: E731
    return meta.to_stats() | {
        "documents": per_split("documents"),
        "tokens": per_split("tokens"),
        "dropped_tokens": per_split("dropped_tokens"),
        "shards": per_split("shards"),
        "tokenizer_documents": trained_on[0],
        "tokenizer_seconds": round(tokenizer_s, 3),
        "encode_seconds": round(encode_s, 3),
        "tokens_per_s": round(total_tokens / encode_s, 1) if encode_s > 0 else None,
    }


def _summary(path: Path, stats: dict, reused: bool) -> dict:
    return {"output": str(path), "reused": reused, **stats}
