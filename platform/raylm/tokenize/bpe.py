"""Byte-level BPE: train a `tokenizers` tokenizer from batches of text, save it, load it.

Byte-level means the pre-tokenizer maps every byte to one of 256 visible characters
before merging, so any text encodes without unknown tokens and `decode(encode(x)) == x`.
The special tokens get the first ids, in the configured order: the first one,
the end-of-text separator, has id 0.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raylm import storage
from raylm.errors import ConfigError, InputError
from raylm.tokenize.config import BYTE_ALPHABET_SIZE

TOKENIZER_FILE = "tokenizer.json"


def min_vocab_size(special_tokens: Iterable[str]) -> int:
    """The smallest vocabulary a byte-level BPE with these special tokens can have."""
    return BYTE_ALPHABET_SIZE + len(tuple(special_tokens))


def check_vocab_size(vocab_size: int, special_tokens: Iterable[str]) -> None:
    """ConfigError when the vocabulary cannot hold the 256 bytes plus the special tokens."""
    specials = tuple(special_tokens)
    needed = min_vocab_size(specials)
    if vocab_size < needed:
        raise ConfigError(
            f"tokenize.vocab_size: {vocab_size} is too small; byte-level BPE needs {BYTE_ALPHABET_SIZE} byte "
            f"tokens + {len(specials)} special tokens = {needed}"
        )


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (no prefix space, so decoding returns the exact input)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    text_batches: Iterable[list[str]],
    *,
    vocab_size: int,
    min_frequency: int,
    special_tokens: Iterable[str],
    num_documents: int | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE on batches of documents (streamed: only the pair counts stay in memory).

    `num_documents`, when known, sizes the trainer's progress bar.
    """
    specials = list(special_tokens)
    check_vocab_size(vocab_size, specials)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer = new_tokenizer()
    tokenizer.train_from_iterator(text_batches, trainer=trainer, length=num_documents)
    return tokenizer


def eos_token_id(tokenizer: Tokenizer, special_tokens: Iterable[str]) -> int:
    """Id of the first special token, the document separator."""
    first = next(iter(special_tokens))
    token_id = tokenizer.token_to_id(first)
    if token_id is None:
        raise InputError(f"tokenizer has no special token {first!r}")
    return token_id


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A saved tokenizer: a tokenizer.json file, or a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise InputError(f"{p}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise InputError(f"{p}: not a `tokenizers` tokenizer file ({str(e).splitlines()[0] if str(e) else e})") from None


VOCAB_MERGES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
"""GPT-2 style byte-level BPE files: the Hugging Face names, then OpenAI's original names."""


def load_existing_tokenizer(path: str | os.PathLike, special_tokens: Iterable[str]) -> Tokenizer:
    """An existing byte-level BPE for the tokenize stage, with the configured special tokens.

    `path`: a tokenizer.json file; or a directory holding tokenizer.json, or vocab.json +
    merges.txt, or encoder.json + vocab.bpe (GPT-2's own files). Special tokens already in
    the vocabulary keep their ids (GPT-2's <|endoftext|> stays 50256); missing ones are
    added after the vocabulary. On an object store, only those files are fetched (to a temporary directory).
    """
    if storage.is_uri(path):
        with tempfile.TemporaryDirectory(prefix="raylm-tokenizer-") as local:
            try:
                return load_existing_tokenizer(_fetch_tokenizer_files(str(path), local), special_tokens)
            except InputError as e:  # name the URI, not the temporary copy
                raise InputError(str(e).replace(local, str(path).rstrip("/"))) from None
    p = Path(path)
    pair = next(((p / v, p / m) for v, m in VOCAB_MERGES if (p / v).is_file() and (p / m).is_file()), None)
    if p.is_dir() and not (p / TOKENIZER_FILE).is_file() and pair is not None:
        vocab, merges = pair
        tokenizer = new_tokenizer()
        try:
            tokenizer.model = models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:  # a bare Exception from tokenizers on malformed files
            raise InputError(f"{vocab}, {merges}: not GPT-2 style BPE files ({str(e).splitlines()[0] if str(e) else e})") from None
    elif p.is_dir() and not (p / TOKENIZER_FILE).is_file():
        names = ", ".join([TOKENIZER_FILE] + [f"{v} + {m}" for v, m in VOCAB_MERGES])
        raise InputError(f"{p}: no tokenizer in this directory (looked for {names})")
    else:
        tokenizer = load_tokenizer(p)
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer


def _fetch_tokenizer_files(uri: str, local: str) -> str:
    """Copy the tokenizer file at `uri`, or the tokenizer files of the directory there, into `local`; the path that
    names the same thing there. Missing ones are left for load_existing_tokenizer to report."""
    if storage.is_file(uri):
        target = os.path.join(local, uri.rstrip("/").rsplit("/", 1)[-1])
        Path(target).write_bytes(storage.read_bytes(uri))
        return target
    if not storage.exists(uri):
        raise InputError(f"{uri}: not found")
    for name in (TOKENIZER_FILE, *(n for pair in VOCAB_MERGES for n in pair)):
        if storage.is_file(storage.join(uri, name)):
            Path(local, name).write_bytes(storage.read_bytes(storage.join(uri, name)))
    return local


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Ids the tokenizer can produce: one more than the largest id (added tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
