"""The packed token format, version 2: what tokenize writes and train, distill, tune and evaluate read.

    <tokens>/manifest.json                  stage manifest; its "stats" hold the TokenMeta fields below
    <tokens>/tokenizer.json                 the tokenizer that produced the ids (its hash: TokenMeta.vocab_hash)
    <tokens>/<split>/part-NNNNN.npy         packed sequences, shape (rows, seq_len + 1), in split order
    <tokens>/doc_starts/<split>.npy         int64: where each document starts in the split's token stream
    <tokens>/loss_mask/<split>/part-NNNNN.npy   optional (stats "loss_mask": true): uint8, the shape of the
                                                 token shard of the same name; 1 where the id is a training
                                                 target, 0 where it is not (an SFT prompt, padding)

Splits are `train` and `validation`. Every file is a plain NumPy `.npy` array, so a split
memory-maps (`np.load(f, mmap_mode="r")`, no copy, random access by row) and Ray Data reads
it as it is (`ray.data.read_numpy(<tokens>/<split>)`, column `data`). Ids are stored in the
smallest unsigned integer type that holds the vocabulary (uint16 below 65,536 ids).

The token stream of a split is every document's ids followed by the end-of-text id, in
split order. Row i is `stream[i * seq_len : i * seq_len + seq_len + 1]`: row i+1 starts with
the last id of row i, so inputs are row[:-1], targets row[1:], and every id of the stream
after the first is a target exactly once. Only the tail after the last full row (fewer than
seq_len ids) is left out; the manifest counts it. A document starting at stream position p
starts in row p // seq_len at column p % seq_len, which is what per-document attention and
loss masks are built from (`document_starts`).

A token output on an object store is read from a copy in the node's cache (raylm.storage.local_copy),
downloaded once per node and version, so that it memory-maps like a local one.

Supervised fine-tuning data (raylm.tokenize.sft) uses the same files with one example per row,
padded, and a loss mask: target j of a row (id j + 1) counts only where mask[j + 1] is 1.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raylm import storage
from raylm.artifacts import require_stage_output
from raylm.errors import InputError

FORMAT_VERSION = 2
SPLITS = ("train", "validation")
TOKENIZER_FILE = "tokenizer.json"
DOC_STARTS_DIR = "doc_starts"
LOSS_MASK_DIR = "loss_mask"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type holding ids below vocab_size."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise ValueError(f"vocab_size {vocab_size} does not fit in 32 bits")


def vocab_hash(tokenizer_json: str) -> str:
    """SHA-256 (hex, first 16 digits) of what decides the ids: normalizer, pre-tokenizer, model, added tokens.

    Two tokenizers with the same hash encode every text to the same ids; the decoder and
    other settings that do not change ids are left out.
    """
    spec = json.loads(tokenizer_json)
    keys = ("normalizer", "pre_tokenizer", "model", "added_tokens")
    canonical = json.dumps({k: spec.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_vocab_hash(path: str | os.PathLike) -> str:
    """vocab_hash of a tokenizer.json file (a local path or a URI), or an InputError naming the file."""
    p = str(path)
    try:
        return vocab_hash(storage.read_text(p))
    except FileNotFoundError:
        raise InputError(f"{p}: tokenizer file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not a tokenizer.json file ({e})") from None


def shard_name(index: int) -> str:
    return f"part-{index:05d}.npy"


@dataclass(frozen=True)
class TokenMeta:
    path: Path
    vocab_size: int
    seq_len: int
    eos_token_id: int
    dtype: str
    num_sequences: dict[str, int]
    vocab_hash: str = ""
    format_version: int = FORMAT_VERSION
    loss_mask: bool = False
    """Each token shard has a loss mask beside it (loss_mask/<split>/): only masked-in ids are targets."""
    location: str = ""
    """Where the output lives, as configured (a URI for an object store; `path` is then this node's copy)."""

    def __post_init__(self):
        if not self.location:
            object.__setattr__(self, "location", str(self.path))

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    def split_dir(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.path / split

    def loss_mask_dir(self, split: str) -> Path:
        self.split_dir(split)  # validates the name
        return self.path / LOSS_MASK_DIR / split

    def doc_starts_file(self, split: str) -> Path:
        self.split_dir(split)  # validates the name
        return self.path / DOC_STARTS_DIR / f"{split}.npy"

    def to_stats(self) -> dict:
        return {
            "format_version": self.format_version,
            "vocab_size": self.vocab_size,
            "vocab_hash": self.vocab_hash,
            "seq_len": self.seq_len,
            "eos_token_id": self.eos_token_id,
            "dtype": self.dtype,
            "num_sequences": dict(self.num_sequences),
            "loss_mask": self.loss_mask,
        }


def read_token_meta(path: str | os.PathLike) -> TokenMeta:
    """Metadata of a finished tokenize output, or an InputError naming what is wrong.

    Checks the format version and that tokenizer.json is the tokenizer the shards were written with.
    An output on an object store is copied to this node's cache first (once per node and version).
    """
    manifest = require_stage_output(path, "tokenize")
    stats = manifest.get("stats") or {}
    version = stats.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"{path}: token format version {version!r}, this raylm reads version {FORMAT_VERSION}; run `raylm tokenize` again"
        )
    meta = TokenMeta(
        path=Path(storage.local_copy(path, manifest["fingerprint"])),
        vocab_size=int(stats["vocab_size"]),
        seq_len=int(stats["seq_len"]),
        eos_token_id=int(stats["eos_token_id"]),
        dtype=str(stats["dtype"]),
        num_sequences={k: int(v) for k, v in stats["num_sequences"].items()},
        vocab_hash=str(stats["vocab_hash"]),
        loss_mask=bool(stats.get("loss_mask", False)),
        location=str(path),
    )
    found = file_vocab_hash(meta.tokenizer_file)
    if found != meta.vocab_hash:
        raise InputError(
            f"{meta.tokenizer_file}: tokenizer {found}, but the token shards were written with tokenizer "
            f"{meta.vocab_hash} (manifest.json); the file was replaced after tokenizing"
        )
    return meta


def check_same_tokenizer(meta: TokenMeta, tokenizer_file: str | os.PathLike, what: str) -> None:
    """InputError when `tokenizer_file` (of `what`, e.g. a model) encodes differently from the one of the token data."""
    theirs = file_vocab_hash(tokenizer_file)
    if theirs != meta.vocab_hash:
        raise InputError(
            f"{tokenizer_file}: {what} uses tokenizer {theirs}, but the token shards in {meta.path} were written "
            f"with tokenizer {meta.vocab_hash}; tokenize the data with the model's tokenizer (tokenize.tokenizer)"
        )


class TokenSplit:
    """One split of a token output, memory-mapped: `len(split)` rows, `split.rows(indices)` gathers them.

    Nothing is read until rows are gathered; gathering touches only the pages of those rows.
    """

    def __init__(self, meta: TokenMeta, split: str):
        self.meta = meta
        self.split = split
        self.width = meta.seq_len + 1
        files = sorted(meta.split_dir(split).glob("part-*.npy"))
        self._arrays = [self._open(f) for f in files]
        mask_dir = meta.loss_mask_dir(split)
        self._masks = [self._open(mask_dir / f.name, np.dtype(np.uint8)) for f in files] if meta.loss_mask else None
        for f, a, m in zip(files, self._arrays, self._masks or []):
            if len(m) != len(a):
                raise InputError(f"{mask_dir / f.name}: {len(m)} loss-mask rows for the {len(a)} rows of {f}")
        sizes = np.array([len(a) for a in self._arrays], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        expected = meta.num_sequences.get(split, 0)
        if self._starts[-1] != expected:
            raise InputError(
                f"{meta.split_dir(split)}: {self._starts[-1]} sequences in {len(files)} files, the manifest says {expected}"
            )

    def _open(self, f: Path, dtype: np.dtype | None = None) -> np.ndarray:
        dtype = dtype or np.dtype(self.meta.dtype)
        try:
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{f}: not a readable .npy token shard ({e})") from None
        if a.ndim != 2 or a.shape[1] != self.width or a.dtype != dtype:
            raise InputError(
                f"{f}: shape {a.shape} {a.dtype}, expected (rows, {self.width}) {dtype} (seq_len {self.meta.seq_len})"
            )
        return a

    def __len__(self) -> int:
        return int(self._starts[-1])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at these split-wide indices, in the order given: a (len(indices), seq_len + 1) array."""
        return self._gather(self._arrays, indices)

    def mask_rows(self, indices: np.ndarray) -> np.ndarray:
        """The loss masks (uint8) of the same rows; ValueError when the data has none (meta.loss_mask false)."""
        if self._masks is None:
            raise ValueError(f"{self.meta.path}: this token data has no loss masks")
        return self._gather(self._masks, indices)

    def _gather(self, arrays: list[np.ndarray], indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.width), dtype=arrays[0].dtype if arrays else self.meta.dtype)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        which = np.searchsorted(self._starts, indices, side="right") - 1
        for f in np.unique(which):
            sel = which == f
            local = indices[sel] - self._starts[f]
            order = np.argsort(local, kind="stable")  # read each file front to back
            out[np.flatnonzero(sel)[order]] = arrays[f][local[order]]
        return out

    def head(self, n: int) -> np.ndarray:
        """The first n rows (all when fewer)."""
        return self.rows(np.arange(min(n, len(self))))


def document_starts(meta: TokenMeta, split: str) -> np.ndarray:
    """Stream positions where the split's documents start (int64, memory-mapped, ascending)."""
    f = meta.doc_starts_file(split)
    try:
        return np.load(f, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{f}: document index not found") from None


def row_document_starts(starts: np.ndarray, row: int, seq_len: int) -> np.ndarray:
    """Columns of row `row` at which a document starts (row covers stream[row * seq_len : row * seq_len + seq_len + 1])."""
    lo = row * seq_len
    a, b = np.searchsorted(starts, [lo, lo + seq_len + 1])
    return np.asarray(starts[a:b]) - lo


def read_split_numpy(meta: TokenMeta, split: str, max_rows: int | None = None) -> np.ndarray:
    """A split's first rows (all by default) as an (N, seq_len + 1) int64 array, for evaluation and tests."""
    data = TokenSplit(meta, split)
    n = len(data) if max_rows is None else min(max_rows, len(data))
    return data.head(n).astype(np.int64)


def write_token_split(out_dir: str | os.PathLike, split: str, rows: np.ndarray, shard_rows: int) -> int:
    """Write one split's packed rows as part-NNNNN.npy shards of at most shard_rows rows; returns the shard count."""
    d = Path(out_dir) / split
    d.mkdir(parents=True, exist_ok=True)
    count = 0
    for count, lo in enumerate(range(0, len(rows), shard_rows), start=1):
        np.save(d / shard_name(count - 1), np.ascontiguousarray(rows[lo : lo + shard_rows]), allow_pickle=False)
    return count


def write_token_data(
    out_dir: str | os.PathLike,
    tokenizer,
    eos_token_id: int,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    shard_rows: int = 8192,
    loss_masks: dict[str, np.ndarray] | None = None,
) -> TokenMeta:
    """Write a whole token output from in-memory arrays (tests, small data): split -> (rows, document starts).

    `loss_masks`: split -> 0/1 array shaped like its rows, written beside the shards (SFT data).

    `tokenizer` is a `tokenizers` Tokenizer (or its ByteLevelBPETokenizer wrapper). Returns the
    TokenMeta whose `to_stats()` the tokenize manifest needs; the tokenize stage itself writes
    the same files while it streams (pipeline.py).
    """
    out = Path(out_dir)
    tokenizer_json = tokenizer.to_str()
    (out / TOKENIZER_FILE).write_text(tokenizer_json)
    (out / DOC_STARTS_DIR).mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    counts = {}
    for split in SPLITS:
        rows, starts = splits[split]
        write_token_split(out, split, np.asarray(rows).astype(dtype), shard_rows)
        np.save(out / DOC_STARTS_DIR / f"{split}.npy", np.asarray(starts, dtype=np.int64), allow_pickle=False)
        counts[split] = len(rows)
        if loss_masks is not None:
            mask = np.asarray(loss_masks[split])
            if mask.shape != np.shape(rows):
                raise ValueError(f"{split}: loss mask of shape {mask.shape} for rows of shape {np.shape(rows)}")
            write_token_split(out / LOSS_MASK_DIR, split, mask.astype(np.uint8), shard_rows)
    seq_len = int(np.asarray(splits["train"][0]).shape[1]) - 1
    return TokenMeta(out, vocab_size, seq_len, eos_token_id, dtype.name, counts, vocab_hash(tokenizer_json),
                     loss_mask=loss_masks is not None)  # fmt: skip
