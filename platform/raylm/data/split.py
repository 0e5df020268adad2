"""Train/validation split by a salted hash of each document's text.

The decision depends only on the text and the seed, so it is the same on every run, for any
sharding or order of the input, and copies of a text could never land on both sides.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

TRAIN, VALIDATION = "train", "validation"
SPLITS = (TRAIN, VALIDATION)


def split_point(text: str, seed: int) -> float:
    """A number in [0, 1), uniform over texts, fixed for a (text, seed) pair."""
    h = hashlib.blake2b(f"split-seed:{seed}\n".encode(), digest_size=8)
    h.update(text.encode("utf-8"))
    return int.from_bytes(h.digest(), "little") / 2**64


def split_of(text: str, seed: int, validation_fraction: float) -> str:
    """`validation` for about `validation_fraction` of all texts, `train` for the rest."""
    return VALIDATION if split_point(text, seed) < validation_fraction else TRAIN


def add_split(batch: pa.Table, *, seed: int, validation_fraction: float) -> pa.Table:
    """Ray Data batch function: append column `split` (`train` or `validation`)."""
    splits = [split_of(t, seed, validation_fraction) for t in batch.column("text").to_pylist()]
    return batch.append_column("split", pa.array(splits, pa.string()))
