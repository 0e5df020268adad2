"""Where artifacts live: local (or NFS) paths and object-store URIs, through pyarrow's filesystems.

A location is a local path (`runs/demo/tokens`, `/mnt/nfs/x`) or a URI (`s3://bucket/prefix`,
`gs://...`, any scheme pyarrow or an installed fsspec implementation knows). Credentials and
endpoints come from the environment, as the cloud SDKs read them (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...).
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from raylm.errors import InputError, first_line

CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_STORAGE_")
"""Environment variables that configure object-store clients."""


def is_uri(path: str) -> bool:
    """True for `scheme://...` locations, False for local paths."""
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """The location as every process of a run names it: a URI as it is, a local path made absolute.

    Ray workers run in directories of their own, so a relative path means something else there.
    """
    path = str(path)
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


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
            import fsspec  # only for schemes pyarrow has no client of its own for

            fs, inner = fsspec.core.url_to_fs(path)
            return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
        except Exception:
            raise InputError(f"{path}: cannot open this location ({first_line(native_error)})") from None


def storage_credentials() -> dict[str, str]:
    """The object-store settings of this process's environment (AWS_*, GOOGLE_*, GCS_*, AZURE_STORAGE_*).

    Tasks run in Ray workers, whose environment is the cluster's; the settings the user has where
    they start a stage go with its tasks, as they would for a read in the driver.
    """
    return {k: v for k, v in os.environ.items() if k.startswith(CREDENTIAL_PREFIXES)}
