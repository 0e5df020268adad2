"""Where artifacts live: local (or NFS) paths and object-store URIs, through pyarrow's filesystems.

A location is a local path (`runs/demo/tokens`, `/mnt/nfs/x`) or a URI (`s3://bucket/prefix`,
`gs://...`, any scheme pyarrow or an installed fsspec implementation knows). Credentials and
endpoints come from the environment, as the cloud SDKs read them (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...).

    write_text(join(root, "stats.json"), text)     # a whole file: a rename into place on a disk, one PUT on a store
    with open_output(join(root, "x.npy")) as f:    # a stream, for libraries that write to file objects
        np.save(f, array)
    read_text(...), exists(...), list_files(...), remove(...), copy_tree(src, dst)

Object stores have no directories and no rename: a directory here is a prefix, a missing
directory lists as empty, and a write of one object is atomic (readers see all of it or none).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from raylm.errors import InputError, RaylmError, first_line

CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_STORAGE_")
"""Environment variables that configure object-store clients."""
UPLOAD_CHUNK = 8 * 2**20


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` locations, False for local paths."""
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """The location as every process of a run names it: a URI as it is, a local path made absolute.

    Ray workers run in directories of their own, so a relative path means something else there.
    """
    path = str(path)
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...`: with "/" inside a URI, the platform's separator on a local path."""
    base = str(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path within it.

    Schemes pyarrow knows (file, s3, gs, hdfs, abfs) use its native clients; others go through
    fsspec when an fsspec implementation for them is installed.
    """
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if path.startswith("s3://") and (s3 := _s3_from_environment()) is not None:
        return s3, path[len("s3://") :]
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as native_error:
        try:
            import fsspec  # only for schemes pyarrow has no client of its own for

            fs, inner = fsspec.core.url_to_fs(path)
            return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
        except Exception:
            raise InputError(f"{path}: cannot open this location ({first_line(native_error)})") from None


def _s3_from_environment() -> pafs.S3FileSystem | None:
    """An S3 client with the keys, region and endpoint of this process's environment, when it names them all.

    Unlike one made from the URI (which reads the environment where it is used), it carries them when
    it is pickled: Ray Train hands it to its controller and workers, whose environment may have none.
    """
    env = os.environ
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY") and region):
        return None
    return pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                             session_token=env.get("AWS_SESSION_TOKEN"), region=region,
                             endpoint_override=env.get("AWS_ENDPOINT_URL"))  # fmt: skip


def exists(path: str | os.PathLike) -> bool:
    """True when a file or a directory is there (pyarrow reports a prefix holding objects as a directory)."""
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def read_bytes(path: str | os.PathLike) -> bytes:
    """A whole file; FileNotFoundError when there is none."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise FileNotFoundError(str(path))
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def open_input(path: str | os.PathLike) -> BinaryIO:
    """A buffered binary reader of a file, streamed (lines can be iterated); FileNotFoundError when there is none."""
    if not is_uri(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise FileNotFoundError(str(path))
    return io.BufferedReader(fs.open_input_stream(inner), buffer_size=UPLOAD_CHUNK)


@contextmanager
def open_output(path: str | os.PathLike) -> Iterator:
    """A binary stream that becomes the file at `path` when the block ends without an error.

    On a disk the bytes go to a temporary name in the same directory, renamed into place at the
    end. For an object store they are spooled to a local temporary file and uploaded at the end:
    an object appears whole when its upload completes, and a write that fails uploads nothing.
    """
    if not is_uri(path):
        final = os.path.abspath(path)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, inner = filesystem(path)
    with tempfile.TemporaryFile(prefix="raylm-upload-") as spool:  # a failed write must not become an object
        yield spool
        spool.seek(0)
        with fs.open_output_stream(inner) as f:
            shutil.copyfileobj(spool, f, UPLOAD_CHUNK)


@contextmanager
def local_file(path: str | os.PathLike) -> Iterator[str]:
    """A local path to write a file to, for libraries that want a path; it becomes `path` when the block ends."""
    directory = tempfile.mkdtemp(prefix="raylm-file-")
    try:
        local = os.path.join(directory, os.path.basename(str(path).rstrip("/")))
        yield local
        with open(local, "rb") as src, open_output(path) as dst:
            shutil.copyfileobj(src, dst, UPLOAD_CHUNK)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def local_dir(location: str | os.PathLike) -> Iterator[Path]:
    """A local directory for code that writes files by path: `location` itself on a disk; for a URI, a temporary
    directory whose files are uploaded under `location` when the block ends without an error."""
    if not is_uri(location):
        os.makedirs(location, exist_ok=True)
        yield Path(location)
        return
    directory = tempfile.mkdtemp(prefix="raylm-upload-")
    try:
        yield Path(directory)
        copy_tree(directory, location)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never part of it."""
    with open_output(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


@dataclass(frozen=True)
class FileEntry:
    name: str
    """Path relative to the listed directory, with "/" between parts."""
    size: int
    mtime_ns: int | None


def list_files(path: str | os.PathLike) -> list[FileEntry]:
    """Every file under a directory (or prefix), recursively, sorted by name; [] when there is none."""
    fs, inner = filesystem(path)
    base = inner.rstrip("/")
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    files = [FileEntry(i.path[len(base) + 1 :], i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File]
    return sorted(files, key=lambda e: e.name.split("/"))  # parent before child, as pathlib sorts


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a directory tree (every object under a prefix); nothing there is fine."""
    fs, inner = filesystem(path)
    if is_uri(path) and "/" not in inner.strip("/"):
        raise RaylmError(f"{path}: refusing to delete a whole bucket; give a prefix inside it")
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        fs.delete_file(inner)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(inner)


def make_dirs(path: str | os.PathLike) -> None:
    """Create a directory and its parents on a disk; object stores have no directories to create."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy every file under `src` to the same names under `dst` (any two kinds of location)."""
    src_fs, src_inner = filesystem(src)
    dst_fs, dst_inner = filesystem(dst)
    make_dirs(dst)
    pafs.copy_files(src_inner, dst_inner, source_filesystem=src_fs, destination_filesystem=dst_fs)


def storage_credentials() -> dict[str, str]:
    """The object-store settings of this process's environment (AWS_*, GOOGLE_*, GCS_*, AZURE_STORAGE_*).

    Tasks run in Ray workers, whose environment is the cluster's; the settings the user has where
    they start a stage go with its tasks, as they would for a read in the driver.
    """
    return {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_PREFIXES)}


def stat(path: str | os.PathLike) -> FileEntry | None:
    """The entry of a file (its base name, size, mtime); None for a directory, a prefix or nothing."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        return None
    return FileEntry(info.base_name, info.size, info.mtime_ns)


def worker_settings() -> dict[str, str]:
    """What a Ray worker needs of this process's environment to reach object stores as it does: the
    credentials and endpoints, and the node cache's directory when one is set."""
    env = storage_credentials()
    if CACHE_ENV in os.environ:
        env[CACHE_ENV] = os.environ[CACHE_ENV]
    return env


def settings_for(*locations: str | os.PathLike) -> dict[str, str]:
    """`worker_settings()` when one of `locations` is on an object store, else nothing: what the Ray workers that
    read or write those locations need in their environment."""
    return worker_settings() if any(is_uri(x) for x in locations) else {}


def task_env(*locations: str | os.PathLike) -> dict:
    """Ray remote args for tasks that read or write `locations`: on an object store, this process's storage settings.

    Workers of a cluster started elsewhere do not have the settings of the shell that runs the stage.
    """
    settings = settings_for(*locations)
    return {"runtime_env": {"env_vars": settings}} if settings else {}


def run_config_storage(location: str | os.PathLike) -> dict:
    """`storage_path` (and `storage_filesystem`) for Ray Train's and Ray Tune's RunConfig.

    On an object store: the path inside it, with the client of `filesystem()`, which carries this process's
    settings to Ray's controller and workers (a client Ray makes from the URI reads their environment instead).
    """
    if not is_uri(location):
        return {"storage_path": str(location)}
    fs, inner = filesystem(location)
    return {"storage_path": inner, "storage_filesystem": fs}


def listing_version(location: str | os.PathLike) -> str:
    """A hash of the name, size and modification time of the file at `location`, or of every file under it."""
    entry = stat(location)
    entries = [entry] if entry is not None else list_files(location)
    return hashlib.sha256("".join(f"{f.name}:{f.size}:{f.mtime_ns}\n" for f in entries).encode()).hexdigest()


def check_writable(location: str | os.PathLike) -> None:
    """Raise one InputError naming `location` and the cause when a stage could not write there.

    For an object store: the endpoint answers, the bucket exists, and a probe object can be written
    and deleted with the credentials at hand. raylm.stages.run_stage checks each stage's output so, before
    Ray starts. Local paths: nothing to check here (the directory is made when the stage writes).
    """
    location = str(location)
    if not is_uri(location):
        return
    fs, inner = filesystem(location)
    bucket = inner.split("/")[0]
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as e:
        raise InputError(f"{location}: {_store_error(e)}") from None
    if not found:
        raise InputError(f"{location}: bucket `{bucket}` does not exist (create it, or set run.workdir to another)")
    probe = join(location, f".raylm-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except OSError as e:
        raise InputError(f"{location}: cannot write there ({_store_error(e)})") from None


def _store_error(e: OSError) -> str:
    """What went wrong in an object-store call, in words, from pyarrow's error text."""
    text = str(e)
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "Couldn't connect" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the storage service"
        return f"cannot reach {endpoint}: {text.split(': ')[-1].strip()}"
    if any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY", "SIGNATURE_DOES_NOT_MATCH",
                               "credentials", "403")):  # fmt: skip
        return f"access refused; check the credentials (AWS_ACCESS_KEY_ID, ...): {first_line(e)}"
    return first_line(e)


CACHE_ENV = "RAYLM_CACHE_DIR"
"""Where a node keeps its copies of object-store artifacts (default: <temp dir>/raylm-cache)."""
_COMPLETE = ".raylm-complete"


def cache_root() -> str:
    """This node's cache directory for copies of object-store artifacts."""
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "raylm-cache")


def local_copy(location: str | os.PathLike, version: str | None = None) -> str:
    """A local directory holding the files under `location`: the location itself when it is local; for a URI,
    a copy in this node's cache, downloaded once per node and `version` (e.g. a manifest fingerprint; by
    default the names, sizes and modification times of the files there, one listing).

    Processes of one node that ask at the same time wait for the one that downloads (a file lock),
    and a copy appears complete or not at all (downloaded under a temporary name, then renamed).
    """
    location = str(location)
    if not is_uri(location):
        return location
    if version is None:
        if not exists(location):
            raise InputError(f"{location}: nothing there")
        version = listing_version(location)
    root = cache_root()
    key = hashlib.sha256(f"{location}\n{version}".encode()).hexdigest()[:16]
    target = os.path.join(root, key)
    if os.path.exists(os.path.join(target, _COMPLETE)):
        return target
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(target, _COMPLETE)):
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                copy_tree(location, tmp)
                with open(os.path.join(tmp, _COMPLETE), "w") as f:
                    f.write(f"{location}\n{version}\n")
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
