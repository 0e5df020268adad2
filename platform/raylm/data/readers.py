"""Find raw text shards and read them as documents with stable ids.

Formats: JSON Lines (`.jsonl`, `.ndjson`, optionally `.gz`), one object per line, and Parquet
(`.parquet`). Every document gets an id that does not change between runs: the value of the
configured id field, else `<file>:<line>` (JSONL, 1-based like an editor) or `<file>:<row>`
(Parquet, 0-based like pyarrow), where `<file>` is the path relative to the input directory.

The driver only lists files; records are read inside Ray Data tasks, one file per task,
streamed in batches. Local paths only for now: listing (`list_input_files`) and opening
(`_open_binary`, `_open_parquet`) are the two places where a pyarrow/fsspec filesystem goes.
Bad records go through `_bad_record`, which raises; that is where a quarantine would go.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.exceptions import UserCodeException

from raylm.errors import InputError

PACKAGE_PREFIX = "package:"
"""`package:<name>` names a corpus bundled in raylm/assets/<name>."""
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)


@dataclass(frozen=True)
class InputFile:
    """One shard to read."""

    path: str
    """Where to open it."""
    name: str
    """Its path relative to the input directory (or its file name): the `<file>` part of default ids."""
    format: str
    """`jsonl` or `parquet`."""
    size_bytes: int


def resolve_input(spec: str) -> str:
    """The local path or glob behind an input spec; `package:<name>` is the bundled corpus `<name>`."""
    if not spec.startswith(PACKAGE_PREFIX):
        return os.path.expanduser(spec)
    name = spec[len(PACKAGE_PREFIX) :]
    assets = Path(str(resources.files("raylm").joinpath("assets")))
    corpus = assets / name
    if not name or not corpus.is_dir():
        known = sorted(p.name for p in assets.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        raise InputError(f"{spec}: no bundled corpus named {name!r} (bundled: {', '.join(known) or 'none'})")
    return str(corpus)


def shard_format(path: str) -> str | None:
    """`jsonl`, `parquet`, or None for a file name with no supported suffix."""
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _is_hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in Path(rel).parts)


def list_input_files(spec: str) -> list[InputFile]:
    """The shards an input spec names, sorted: a directory (searched recursively), a glob, or one file.

    In a directory or glob, files without a supported suffix (a README, a script) and hidden
    files are skipped. Raises InputError naming the path when it is missing, unreadable or
    yields no shard.
    """
    path = resolve_input(spec)
    if glob.has_magic(path):
        root = _static_prefix(path)
        matches = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise InputError(f"{spec}: no files match")
        found = [(p, os.path.relpath(p, root)) for p in matches]
    elif os.path.isdir(path):
        found = [
            (os.path.join(d, f), os.path.relpath(os.path.join(d, f), path))
            for d, _, files in os.walk(path)
            for f in files
        ]
    elif os.path.isfile(path):
        if shard_format(path) is None:
            raise InputError(f"{spec}: unsupported file type (expected one of {SUPPORTED})")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: not readable")
        return [InputFile(path, os.path.basename(path), shard_format(path), os.path.getsize(path))]
    else:
        raise InputError(f"{spec}: input not found")
    shards = [(p, rel) for p, rel in found if shard_format(p) and not _is_hidden(rel)]
    if not shards:
        raise InputError(f"{spec}: no shards ({SUPPORTED}) found")
    for p, _ in shards:
        if not os.access(p, os.R_OK):
            raise InputError(f"{p}: not readable")
    return [InputFile(p, rel, shard_format(p), os.path.getsize(p)) for p, rel in sorted(shards, key=lambda s: s[1])]


def _static_prefix(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: `data/*/x.jsonl` -> `data`."""
    parts = Path(pattern).parts
    static = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return os.path.join(*static) if static else "."


class ShardInputError(InputError, UserCodeException):
    """An InputError raised inside a Ray Data task.

    Ray Data marks errors raised by a UDF call as the user's, but not those raised while it
    iterates the generator the call returned; without the UserCodeException base a bad record
    would be logged with a full traceback as a suspected Ray Data bug. The InputError base
    survives the trip to the driver (a chained `__cause__` would not), where it is re-raised.
    """


def _bad_record(where: str, why: str) -> None:
    """A record that cannot be read. Raises now; a quarantine option would count and keep it instead."""
    raise InputError(f"{where}: {why}")


def _open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _open_parquet(path: str) -> pq.ParquetFile:
    return pq.ParquetFile(path)


def _record_id(record: dict, id_field: str | None, default: str, where: str) -> str | None:
    if id_field is None:
        return default
    value = record.get(id_field)
    if value is None:
        _bad_record(where, f"record has no {id_field!r} field (prepare.id_field)")
        return None
    return str(value)


def read_jsonl(file: InputFile, text_field: str, id_field: str | None) -> Iterator[tuple[str, str]]:
    """(id, text) per JSON object line; blank lines are skipped. Raises InputError naming file:line."""
    with _open_binary(file.path) as stream:
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            where = f"{file.path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                _bad_record(where, f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
                continue
            except UnicodeDecodeError:
                _bad_record(where, "not valid UTF-8")
                continue
            if not isinstance(record, dict):
                _bad_record(where, f"expected a JSON object, got {type(record).__name__}")
                continue
            text = record.get(text_field)
            if not isinstance(text, str):
                why = "record has no" if text is None else f"{type(text).__name__} in"
                _bad_record(where, f"{why} text field {text_field!r} (prepare.text_field)")
                continue
            doc_id = _record_id(record, id_field, f"{file.name}:{lineno}", where)
            if doc_id is not None:
                yield doc_id, text


def read_parquet(
    file: InputFile, text_field: str, id_field: str | None, batch_rows: int
) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) per Parquet record batch. Raises InputError naming the file (and row)."""
    pf = _open_parquet(file.path)
    schema = pf.schema_arrow
    for field in (text_field, id_field):
        if field is not None and field not in schema.names:
            which = "text_field" if field == text_field else "id_field"
            raise InputError(f"{file.path}: no column {field!r} (prepare.{which}; columns: {', '.join(schema.names)})")
    if not pa.types.is_string(schema.field(text_field).type) and not pa.types.is_large_string(
        schema.field(text_field).type
    ):
        raise InputError(f"{file.path}: column {text_field!r} is {schema.field(text_field).type}, expected strings")
    columns = [text_field] + ([id_field] if id_field else [])
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        texts = batch.column(text_field)
        if texts.null_count:
            first = next(i for i, v in enumerate(texts.is_null().to_pylist()) if v)
            _bad_record(f"{file.path}: row {row + first}", f"text field {text_field!r} is null")
        if id_field:
            ids_col = batch.column(id_field)
            if ids_col.null_count:
                first = next(i for i, v in enumerate(ids_col.is_null().to_pylist()) if v)
                _bad_record(f"{file.path}: row {row + first}", f"id field {id_field!r} is null")
            ids = [str(v) for v in ids_col.to_pylist()]
        else:
            ids = [f"{file.name}:{row + i}" for i in range(batch.num_rows)]
        row += batch.num_rows
        yield ids, texts.to_pylist()


def read_shard(file: InputFile, text_field: str, id_field: str | None, batch_rows: int) -> Iterator[pa.Table]:
    """Tables of `id`, `text` of at most `batch_rows` documents, streamed from one shard.

    Raises InputError naming the file when it cannot be read or holds no records.
    """
    count = 0
    try:
        if file.format == "parquet":
            for ids, texts in read_parquet(file, text_field, id_field, batch_rows):
                count += len(ids)
                yield _table(ids, texts)
        else:
            ids, texts = [], []
            for doc_id, text in read_jsonl(file, text_field, id_field):
                ids.append(doc_id)
                texts.append(text)
                if len(ids) >= batch_rows:
                    count += len(ids)
                    yield _table(ids, texts)
                    ids, texts = [], []
            if ids:
                count += len(ids)
                yield _table(ids, texts)
    except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
        raise InputError(f"{file.path}: cannot read ({_first_line(e)})") from None
    if count == 0:
        raise InputError(f"{file.path}: no records")


def read_shards_batch(batch: dict[str, Any], *, text_field: str, id_field: str | None, batch_rows: int):
    """Ray Data batch function: from rows describing shards (`InputFile` fields), yield their documents."""
    for i in range(len(batch["path"])):
        file = InputFile(
            path=str(batch["path"][i]),
            name=str(batch["name"][i]),
            format=str(batch["format"][i]),
            size_bytes=int(batch["size_bytes"][i]),
        )
        try:
            yield from read_shard(file, text_field, id_field, batch_rows)
        except InputError as e:
            raise ShardInputError(str(e)) from None


def _table(ids: list[str], texts: list[str]) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())})


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
