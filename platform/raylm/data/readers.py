"""Read raw text shards as documents with stable ids, and bad records as rows that say what is wrong and where.

Formats, by suffix (raylm.data.sources lists the shards): JSON Lines (one object per line),
Parquet and plain text (a document per file, paragraph or line, `txt_documents`); JSON Lines
and text may be compressed (`.gz`, `.zst`). Shards under an object-store URI are opened
through raylm.storage, with credentials and endpoints from the environment.

Every document gets an id that does not change between runs: the configured id field, else
`<name>:<line>` (JSON Lines and text, 1-based like an editor), `<name>:<row>` (Parquet, 0-based
like pyarrow) or `<name>` (a whole text file), where `<name>` is the shard's path relative to
the input root.

Records are read inside Ray Data tasks (`read_documents`), one shard per task, in blocks of at
most `batch_rows` documents. Bad records (malformed JSON, invalid UTF-8, a missing text field,
an empty, truncated or unreadable file) become rows with `error_kind` and a one-line `error`
naming file and line (`on_error: quarantine`), or stop the run at the first one (`on_error:
fail`). A bad record never takes its good neighbours with it.
"""

from __future__ import annotations

import gzip
import json
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import zstandard
from ray.data.exceptions import UserCodeException

from raylm.data.config import PrepareConfig
from raylm.data.sources import InputFile
from raylm.errors import InputError, first_line
from raylm.storage import filesystem, is_uri, task_env

MAX_EXCERPT = 64 * 1024
"""Characters of a bad record kept in the quarantine."""
READ_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("error_kind", pa.string()), ("error", pa.string())])
"""What the reader emits: documents (error columns null) and bad records (error_kind, error set)."""
ERROR_KINDS = ("malformed_json", "invalid_utf8", "not_an_object", "missing_text", "missing_id", "empty_file",
               "truncated", "unreadable")  # fmt: skip


class ShardInputError(InputError, UserCodeException):
    """An InputError raised inside a Ray Data task.

    Ray Data marks errors raised by a UDF call as the user's, but not those raised while it
    iterates the generator the call returned; without the UserCodeException base a bad record
    would be logged with a full traceback as a suspected Ray Data bug. The InputError base
    survives the trip to the driver (a chained `__cause__` would not), where it is re-raised.
    """


@dataclass
class Record:
    """One document, or one bad record (`kind` set, `text` holding what could be read of it)."""

    id: str
    text: str
    kind: str | None = None
    error: str | None = None


def _bad(doc_id: str, where: str, kind: str, why: str, raw: str | bytes = "") -> Record:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return Record(doc_id, raw[:MAX_EXCERPT], kind, f"{where}: {why}")


class _Truncated(Exception):
    """A compressed stream ended early or is corrupt."""


def _open_raw(file: InputFile) -> IO[bytes]:
    if is_uri(file.path):
        fs, inner = filesystem(file.path)
        return fs.open_input_stream(inner, compression=None)
    return open(file.path, "rb")


@contextmanager
def _lines(file: InputFile) -> Iterator[Iterator[bytes]]:
    """The lines of a shard, decompressed for .gz and .zst and streamed; damage ends them with _Truncated."""
    with _open_raw(file) as raw:
        lower = file.path.lower()
        if lower.endswith(".zst"):
            yield _zstd_lines(raw)
        elif lower.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield _guarded(stream)
        elif is_uri(file.path):  # pyarrow streams read in chunks but do not iterate lines
            yield _split_lines(iter(lambda: raw.read(1 << 20), b""))
        else:
            yield _guarded(raw)


def _guarded(stream: IO[bytes]) -> Iterator[bytes]:
    try:
        yield from stream
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _Truncated(first_line(e)) from None


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines (with their newline) of a stream given as chunks of bytes."""
    pending = b""
    for chunk in chunks:
        *whole, pending = (pending + chunk).split(b"\n")
        for line in whole:
            yield line + b"\n"
    if pending:
        yield pending


def _zstd_lines(raw: IO[bytes], chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a Zstandard stream of one or more frames; a frame cut short raises _Truncated after its last whole line."""
    dctx = zstandard.ZstdDecompressor()
    dobj, pending, fed = dctx.decompressobj(), b"", False
    try:
        while chunk := raw.read(chunk_bytes):
            while chunk:
                fed = True
                pending += dobj.decompress(chunk)
                chunk = dobj.unused_data if dobj.eof else b""
                if dobj.eof:
                    dobj, fed = dctx.decompressobj(), False
            *whole, pending = pending.split(b"\n")
            for line in whole:
                yield line + b"\n"
    except zstandard.ZstdError as e:
        raise _Truncated(first_line(e)) from None
    if fed:  # the input ended inside a frame; `pending` is a partial line, lost with the damage
        raise _Truncated("the last frame is incomplete")
    if pending:
        yield pending


def read_jsonl(file: InputFile, text_field: str, id_field: str | None) -> Iterator[Record]:
    """A Record per non-blank line: the document, or why the line is bad (file:line)."""
    lineno = 0
    with _lines(file) as lines:
        try:
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    yield _jsonl_record(file, lineno, line, text_field, id_field)
        except _Truncated as e:
            where = f"{file.path}:{lineno + 1}"
            yield _bad(f"{file.name}:{lineno + 1}", where, "truncated", f"compressed stream ends early or is corrupt ({e})")


def _jsonl_record(file: InputFile, lineno: int, line: bytes, text_field: str, id_field: str | None) -> Record:
    where, default_id = f"{file.path}:{lineno}", f"{file.name}:{lineno}"
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return _bad(default_id, where, "invalid_utf8", f"not valid UTF-8 (byte {e.start + 1})", line)
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as e:
        return _bad(default_id, where, "malformed_json", f"malformed JSON ({e.msg} at column {e.colno})", decoded)
    if not isinstance(record, dict):
        return _bad(default_id, where, "not_an_object", f"expected a JSON object, got {type(record).__name__}", decoded)
    text = record.get(text_field)
    if not isinstance(text, str):
        why = "record has no" if text is None else f"{type(text).__name__} in"
        return _bad(default_id, where, "missing_text", f"{why} text field {text_field!r} (prepare.text_field)", decoded)
    if id_field is None:
        return Record(default_id, text)
    if record.get(id_field) is None:
        return _bad(default_id, where, "missing_id", f"record has no {id_field!r} field (prepare.id_field)", decoded)
    return Record(str(record[id_field]), text)


def read_text(file: InputFile, txt_documents: str) -> Iterator[Record]:
    """Records of a plain-text file: the whole file, each blank-line-separated paragraph, or each line."""
    lineno, first, chunk = 0, 0, []

    def unit() -> Record:
        raw = b"".join(chunk)
        doc_id = file.name if txt_documents == "file" else f"{file.name}:{first}"
        try:
            return Record(doc_id, raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return _bad(doc_id, f"{file.path}:{first}", "invalid_utf8", f"not valid UTF-8 (byte {e.start + 1})", raw)

    with _lines(file) as lines:
        try:
            for lineno, line in enumerate(lines, start=1):
                blank = not line.strip()
                if txt_documents == "line":
                    if not blank:
                        first, chunk = lineno, [line]
                        yield unit()
                    continue
                if txt_documents == "paragraph" and blank:
                    if chunk:
                        yield unit()
                    chunk = []
                    continue
                if not chunk:
                    first = lineno
                chunk.append(line)
        except _Truncated as e:
            if chunk and txt_documents != "file":
                yield unit()
            yield _bad(f"{file.name}:{lineno + 1}", f"{file.path}:{lineno + 1}", "truncated",
                       f"compressed stream ends early or is corrupt ({e})")  # fmt: skip
            return
    if chunk and txt_documents != "line" and any(c.strip() for c in chunk):
        yield unit()


def read_parquet(file: InputFile, text_field: str, id_field: str | None, batch_rows: int) -> Iterator[list[Record]]:
    """Records per Parquet record batch: documents, and a bad record for each null text or id (file: row)."""
    try:
        if is_uri(file.path):
            fs, inner = filesystem(file.path)
            pf = pq.ParquetFile(fs.open_input_file(inner))
        else:
            pf = pq.ParquetFile(file.path)
    except (OSError, pa.ArrowException) as e:
        yield [_bad(f"{file.name}:0", file.path, "unreadable", f"cannot read Parquet ({first_line(e)})")]
        return
    schema = pf.schema_arrow
    if text_field not in schema.names:
        why = f"no column {text_field!r} (prepare.text_field; columns: {', '.join(schema.names)})"
        yield [_bad(f"{file.name}:0", file.path, "missing_text", why)]
        return
    if id_field is not None and id_field not in schema.names:
        yield [_bad(f"{file.name}:0", file.path, "missing_id", f"no column {id_field!r} (prepare.id_field)")]
        return
    if not (pa.types.is_string(schema.field(text_field).type) or pa.types.is_large_string(schema.field(text_field).type)):
        why = f"column {text_field!r} is {schema.field(text_field).type}, expected strings"
        yield [_bad(f"{file.name}:0", file.path, "missing_text", why)]
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field] + ([id_field] if id_field else [])):
            texts = batch.column(text_field).to_pylist()
            ids = batch.column(id_field).to_pylist() if id_field else [None] * len(texts)
            records = []
            for i, (text, given) in enumerate(zip(texts, ids)):
                default_id, where = f"{file.name}:{row + i}", f"{file.path}: row {row + i}"
                if text is None:
                    records.append(_bad(default_id, where, "missing_text", f"text field {text_field!r} is null"))
                elif id_field and given is None:
                    records.append(_bad(default_id, where, "missing_id", f"id field {id_field!r} is null", text))
                else:
                    records.append(Record(str(given) if id_field else default_id, text))
            row += len(texts)
            yield records
    except (OSError, pa.ArrowException) as e:
        yield [_bad(f"{file.name}:{row}", f"{file.path}: row {row}", "truncated", f"cannot read on ({first_line(e)})")]


def read_records(file: InputFile, text_field: str, id_field: str | None, batch_rows: int,
                 txt_documents: str = "file") -> Iterator[list[Record]]:  # fmt: skip
    """Lists of at most `batch_rows` Records from one shard, streamed; a file with none gives one `empty_file` record."""
    if not file.readable:
        yield [_bad(f"{file.name}:0", file.path, "unreadable", "not readable")]
        return
    count = 0
    try:
        if file.format == "parquet":
            for records in read_parquet(file, text_field, id_field, batch_rows):
                count += len(records)
                yield records
        else:
            source = read_jsonl(file, text_field, id_field) if file.format == "jsonl" else read_text(file, txt_documents)
            records = []
            for record in source:
                records.append(record)
                if len(records) >= batch_rows:
                    count += len(records)
                    yield records
                    records = []
            if records:
                count += len(records)
                yield records
    except OSError as e:
        yield [_bad(f"{file.name}:0", file.path, "unreadable", f"cannot read ({first_line(e)})")]
        return
    if count == 0:
        yield [_bad(f"{file.name}:0", file.path, "empty_file", "no records")]


def read_shard(file: InputFile, text_field: str, id_field: str | None, batch_rows: int,
               txt_documents: str = "file", on_error: str = "quarantine") -> Iterator[pa.Table]:  # fmt: skip
    """Tables (READ_SCHEMA) of at most `batch_rows` records from one shard.

    With `on_error="fail"` the first bad record raises an InputError naming file and line instead.
    """
    for records in read_records(file, text_field, id_field, batch_rows, txt_documents):
        if on_error == "fail":
            bad = next((r for r in records if r.kind is not None), None)
            if bad is not None:
                raise InputError(bad.error)
        yield pa.table(
            {
                "id": pa.array([r.id for r in records], pa.string()),
                "text": pa.array([r.text for r in records], pa.string()),
                "error_kind": pa.array([r.kind for r in records], pa.string()),
                "error": pa.array([r.error for r in records], pa.string()),
            },
            schema=READ_SCHEMA,
        )


def read_shards_batch(batch: dict[str, Any], *, text_field: str, id_field: str | None, batch_rows: int,
                      txt_documents: str = "file", on_error: str = "quarantine"):  # fmt: skip
    """Ray Data batch function: from rows describing shards (`InputFile` fields), yield their records."""
    for i in range(len(batch["path"])):
        file = InputFile(**{k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in batch})
        try:
            yield from read_shard(file, text_field, id_field, batch_rows, txt_documents, on_error)
        except InputError as e:
            raise ShardInputError(str(e)) from None


def read_documents(files: list[InputFile], cfg: PrepareConfig):
    """A Ray Dataset of documents and bad records: one read task per shard, streaming blocks of `read_batch_docs`."""
    listing = ray.data.from_items([asdict(f) for f in files], override_num_blocks=len(files))
    return listing.map_batches(
        read_shards_batch,
        batch_size=1,
        **task_env(*(f.path for f in files)),
        fn_kwargs={
            "text_field": cfg.text_field,
            "id_field": cfg.id_field,
            "batch_rows": cfg.read_batch_docs,
            "txt_documents": cfg.txt_documents,
            "on_error": cfg.on_error,
        },
    )
