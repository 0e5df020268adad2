"""Find the raw text shards an input spec names, local or in object storage, without reading them.

An input spec is a local file, directory (searched recursively) or glob, `package:<name>` (a
bundled corpus), or the same under an object-store URI (`s3://bucket/prefix/`, `gs://...`, any
scheme pyarrow or fsspec knows; see raylm.storage). A shard's format comes from its suffix:
JSON Lines (`.jsonl`, `.ndjson`, `.json`), Parquet (`.parquet`) or plain text (`.txt`); JSON
Lines and text may be compressed (`.gz`, `.zst`).

Each shard is listed as an `InputFile` whose `name` is its path relative to the input root, so
that the default document ids built from it (raylm.data.readers) do not depend on where the
corpus is mounted. The driver only lists; the records are read in Ray Data tasks.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyarrow.fs as pafs

from raylm.artifacts import fingerprint_inputs
from raylm.errors import InputError, first_line
from raylm.storage import filesystem, is_uri

PACKAGE_PREFIX = "package:"
"""`package:<name>` names a corpus bundled in raylm/assets/<name>."""
COMPRESSIONS = ("", ".gz", ".zst")
JSONL_SUFFIXES = tuple(s + c for s in (".jsonl", ".ndjson", ".json") for c in COMPRESSIONS)
TEXT_SUFFIXES = tuple(".txt" + c for c in COMPRESSIONS)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = ", ".join((".jsonl", ".ndjson", ".json", ".txt", ".parquet")) + " (JSON Lines and text also .gz, .zst)"


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


def input_fingerprints(spec: str, files: list[InputFile]) -> dict[str, str]:
    """The manifest's fingerprint of the input: of the local directory or file, or of the listed shards' names, sizes and times."""
    path = resolve_input(spec)
    if not glob.has_magic(path) and not is_uri(path):
        return fingerprint_inputs([path])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{f.size_bytes}:{f.mtime_ns}\n".encode())
    return {spec: h.hexdigest()}


def _is_hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in Path(rel).parts)


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
        raise InputError(f"{spec}: cannot list ({first_line(e)})") from None
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
