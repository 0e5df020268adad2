"""Find raw text shards, local or in object storage, and stream them as documents with stable ids.

Formats, by suffix: JSON Lines (`.jsonl`, `.ndjson`, `.json`: one object per line), Parquet
(`.parquet`) and plain text (`.txt`: a document per file, paragraph or line, `txt_documents`);
JSON Lines and text may be compressed (`.gz`, `.zst`). Locations: a local file, directory
(searched recursively) or glob, `package:<name>` (a bundled corpus), or the same under an
object-store URI (`s3://bucket/prefix/`, `gs://...`, any scheme pyarrow or fsspec knows), with
credentials and endpoints from the environment as the cloud SDKs read them (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...).

Every document gets an id that does not change between runs: the configured id field, else
`<name>:<line>` (JSON Lines and text, 1-based like an editor), `<name>:<row>` (Parquet, 0-based
like pyarrow) or `<name>` (a whole text file), where `<name>` is the path relative to the input
root, so that ids do not depend on where the corpus is mounted.

The driver only lists files; records are read inside Ray Data tasks, one file per task, in
blocks of at most `batch_rows` documents. Bad records (malformed JSON, invalid UTF-8, a missing
text field, an empty, truncated or unreadable file) become rows with `error_kind` and a
one-line `error` naming file and line (`on_error: quarantine`), or stop the run at the first one
(`on_error: fail`). A bad record never takes its good neighbours with it.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.exceptions import UserCodeException

from raylm.errors import InputError

PACKAGE_PREFIX = "package:"
"""`package:<name>` names a corpus bundled in raylm/assets/<name>."""
COMPRESSIONS = ("", ".gz", ".zst")
JSONL_SUFFIXES = tuple(s + c for s in (".jsonl", ".ndjson", ".json") for c in COMPRESSIONS)
TEXT_SUFFIXES = tuple(".txt" + c for c in COMPRESSIONS)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = ", ".join((".jsonl", ".ndjson", ".json", ".txt", ".parquet")) + " (JSON Lines and text also .gz, .zst)"
MAX_EXCERPT = 64 * 1024
"""Characters of a bad record kept in the quarantine."""
READ_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("error_kind", pa.string()), ("error", pa.string())])
"""What the reader emits: documents (error columns null) and bad records (error_kind, error set)."""
ERROR_KINDS = ("malformed_json", "invalid_utf8", "not_an_object", "missing_text", "missing_id", "empty_file",
               "truncated", "unreadable")  # fmt: skip


@dataclass(frozen=True)
class InputFile:
    """One shard to read."""

    path: str
    """Where to open it: a local path or a URI."""
    name: str
    """Its path relative to the input root (or its file name): the `<name>` part of default ids."""
    format: str
    """`jsonl`, `parquet` or `txt`."""
    size_bytes: int
    mtime_ns: int = 0
    readable: bool = True
    """False for a file that was listed but cannot be opened: the reader reports it as `unreadable`."""


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_input(spec: str) -> str:
    """The local path, glob or URI behind an input spec; `package:<name>` is the bundled corpus `<name>`."""
    if not spec.startswith(PACKAGE_PREFIX):
        return spec if is_uri(spec) else os.path.expanduser(spec)
    name = spec[len(PACKAGE_PREFIX) :]
    assets = Path(str(resources.files("raylm").joinpath("assets")))
    corpus = assets / name
    if not name or not corpus.is_dir():
        known = sorted(p.name for p in assets.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        raise InputError(f"{spec}: no bundled corpus named {name!r} (bundled: {', '.join(known) or 'none'})")
    return str(corpus)


def shard_format(path: str) -> str | None:
    """`jsonl`, `parquet`, `txt`, or None for a file name with no supported suffix."""
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(TEXT_SUFFIXES):
        return "txt"
    return None


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path within it.

    Schemes pyarrow knows (file, s3, gs, hdfs, abfs) use its native clients; others go through
    fsspec when an fsspec implementation for them is installed.
    """
    if not is_uri(path):
        return pafs.LocalFileSystem(), path
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as native_error:
        try:
            import fsspec
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            fs, inner = fsspec.core.url_to_fs(path)
            return PyFileSystem(FSSpecHandler(fs)), inner
        except Exception:
            raise InputError(f"{path}: cannot open this location ({_first_line(native_error)})") from None


def _is_hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in Path(rel).parts)


def list_input_files(spec: str, on_error: str = "quarantine") -> list[InputFile]:
    """The shards an input spec names, sorted by name: a directory (searched recursively), a glob, or one file.

    In a directory or glob, files without a supported suffix (a README, a script) and hidden
    files are skipped. A missing input, or one with no shard, is an InputError. A shard that
    cannot be read is an InputError with `on_error: fail`, else it is listed as unreadable.
    """
    path = resolve_input(spec)
    if is_uri(path):
        files = _list_uri(spec, path)
    else:
        files = _list_local(spec, path)
    for f in files:
        if not f.readable and on_error == "fail":
            raise InputError(f"{f.path}: not readable")
    return files


def _list_local(spec: str, path: str) -> list[InputFile]:
    if glob.has_magic(path):
        root = _static_prefix(path)
        matches = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p) or os.path.islink(p)]
        if not matches:
            raise InputError(f"{spec}: no files match")
        found = [(p, os.path.relpath(p, root)) for p in matches]
    elif os.path.isdir(path):
        found = [
            (os.path.join(d, f), os.path.relpath(os.path.join(d, f), path))
            for d, _, files in os.walk(path)
            for f in files
        ]
    elif os.path.isfile(path) or os.path.islink(path):
        if shard_format(path) is None:
            raise InputError(f"{spec}: unsupported file type (expected one of {SUPPORTED})")
        found = [(path, os.path.basename(path))]
    else:
        raise InputError(f"{spec}: input not found")
    shards = sorted(((p, rel) for p, rel in found if shard_format(p) and not _is_hidden(rel)), key=lambda s: s[1])
    if not shards:
        raise InputError(f"{spec}: no shards ({SUPPORTED}) found")
    files = []
    for p, rel in shards:
        readable = os.path.isfile(p) and os.access(p, os.R_OK)
        st = os.stat(p) if readable else os.lstat(p)
        files.append(InputFile(p, rel, shard_format(p), st.st_size if readable else 0, st.st_mtime_ns, readable))
    return files


def _list_uri(spec: str, uri: str) -> list[InputFile]:
    fs, inner = filesystem(uri)
    scheme = uri.split("://", 1)[0] + "://"
    try:
        if glob.has_magic(inner):
            root = _static_prefix(inner)
            infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.is_file]
            # `**/` also matches no directory at all, as in a local recursive glob.
            patterns = {inner, inner.replace("**/", "")}
            infos = [i for i in infos if any(fnmatch.fnmatch(i.path, p) for p in patterns)]
        else:
            info = fs.get_file_info(inner)
            if info.type == pafs.FileType.NotFound:
                raise InputError(f"{spec}: input not found")
            root = inner if info.type == pafs.FileType.Directory else os.path.dirname(inner)
            if info.type == pafs.FileType.Directory:
                infos = [i for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if i.is_file]
            else:
                if shard_format(inner) is None:
                    raise InputError(f"{spec}: unsupported file type (expected one of {SUPPORTED})")
                infos = [info]
    except OSError as e:
        raise InputError(f"{spec}: cannot list ({_first_line(e)})") from None
    files = []
    for i in infos:
        rel = os.path.relpath(i.path, root) if root else i.path
        if shard_format(i.path) and not _is_hidden(rel):
            mtime = i.mtime_ns or 0
            files.append(InputFile(scheme + i.path, rel, shard_format(i.path), int(i.size or 0), mtime))
    if not files:
        raise InputError(f"{spec}: no shards ({SUPPORTED}) found")
    return sorted(files, key=lambda f: f.name)


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
        raise _Truncated(_first_line(e)) from None


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
    import zstandard

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
        raise _Truncated(_first_line(e)) from None
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
        yield [_bad(f"{file.name}:0", file.path, "unreadable", f"cannot read Parquet ({_first_line(e)})")]
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
        yield [_bad(f"{file.name}:{row}", f"{file.path}: row {row}", "truncated", f"cannot read on ({_first_line(e)})")]


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
        yield [_bad(f"{file.name}:0", file.path, "unreadable", f"cannot read ({_first_line(e)})")]
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
