"""Stage outputs on a disk or an object store: a manifest beside them, written last, marks them finished.

Every stage writes its output directory through `stage_output`:

    with stage_output(cfg.output, "tokenize", cfg, inputs=[cfg.input]) as out:
        if out.done:             # same config and inputs as the finished output: nothing to do
            return out.manifest
        ...write files under out.tmp (a location: see raylm.storage)...
        out.stats = {...}        # lands in manifest.json

The manifest holds the resolved stage config, a fingerprint of config + inputs, the stats, and
the raylm version. How an output appears depends on where it lives:

- on a disk (or NFS), the stage writes `<output>.tmp-<id>/`, which is renamed to `<output>` once
  the manifest is in it: a killed run leaves only `<output>.tmp-*`;
- on an object store, which has no rename, the stage writes under `<output>/` itself, beside a
  `_raylm_writing.json` that says the prefix is raylm's and unfinished; the manifest is written
  last and is the commit. Readers trust only outputs that have a manifest, and the next run of the
  stage clears an unfinished prefix before writing it again (no copy of every byte, as a
  temporary prefix would need).

Either way nothing that looks finished is left half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from pydantic import BaseModel

import raylm
from raylm import storage
from raylm.errors import InputError, RaylmError

MANIFEST = "manifest.json"
WRITING = "_raylm_writing.json"
"""On an object store: the marker of an output that a stage is writing (or was, when it was killed)."""


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of a finished stage output, or None when there is none."""
    try:
        return json.loads(storage.read_text(storage.join(path, MANIFEST)))
    except (FileNotFoundError, NotADirectoryError):
        return None


def require_stage_output(path: str | os.PathLike, stage: str) -> dict:
    """The manifest of a finished `stage` output at `path`, or an InputError saying what to run first."""
    p = str(path)
    manifest = read_manifest(p)
    if manifest is None:
        if not storage.exists(p):
            raise InputError(f"{p}: not found (run `raylm {stage}` first, or point the config at its output)")
        raise InputError(f"{p}: no {MANIFEST}; not a finished `raylm {stage}` output")
    if manifest.get("stage") != stage:
        raise InputError(f"{p}: written by `raylm {manifest.get('stage')}`, expected `raylm {stage}` output")
    return manifest


def fingerprint_inputs(paths: list[str]) -> dict[str, str]:
    """Per input: the fingerprint from its manifest when it is a stage output, else a hash of file names, sizes and mtimes."""
    prints = {}
    for p in paths:
        manifest = read_manifest(p)
        if manifest is not None:
            prints[p] = manifest["fingerprint"]
            continue
        prints[p] = storage.listing_version(p)
    return prints


def _config_json(config: BaseModel | dict) -> Any:
    return json.loads(config.model_dump_json()) if isinstance(config, BaseModel) else config


def fingerprint(stage: str, config: BaseModel | dict, inputs: dict[str, str]) -> str:
    blob = json.dumps({"stage": stage, "config": _config_json(config), "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageOutput:
    path: str
    """Where the finished output is (a local path or a URI)."""
    tmp: str
    """Where the stage writes it: a temporary directory on a disk, the output prefix itself on an object store."""
    manifest: dict
    done: bool = False
    stats: dict = field(default_factory=dict)

    def file(self, *parts: str) -> str:
        """A location inside what the stage is writing."""
        return storage.join(self.tmp, *parts)

    def write_text(self, name: str, text: str) -> None:
        storage.write_text(self.file(name), text)

    def write_json(self, name: str, data: Any) -> None:
        storage.write_text(self.file(name), json.dumps(data, indent=2))


@contextmanager
def stage_output(
    path: str | os.PathLike,
    stage: str,
    config: BaseModel | dict,
    inputs: list[str] = (),
    overwrite: bool = False,
    input_prints: dict[str, str] | None = None,
) -> Iterator[StageOutput]:
    """Write a stage's output so that it appears complete or not at all; skip the work when a finished
    output has the same fingerprint.

    `input_prints` replaces the fingerprints of `inputs` (for inputs a stage lists itself). An existing
    output from a different config is an error unless `overwrite`.
    """
    final = storage.absolute(path)
    prints = input_prints if input_prints is not None else fingerprint_inputs(list(inputs))
    fp = fingerprint(stage, config, prints)
    existing = read_manifest(final)
    if existing is not None and existing.get("fingerprint") == fp:
        yield StageOutput(final, final, existing, done=True)
        return
    unfinished = existing is None and storage.is_uri(final) and storage.is_file(storage.join(final, WRITING))
    occupied = storage.is_file(final) or bool(storage.list_files(final))  # an empty directory holds nothing to lose
    if occupied and not (overwrite or unfinished):
        why = "from a different config or input" if existing else "and is not a finished raylm output"
        raise RaylmError(f"{final}: output exists {why}; set run.overwrite=true or choose another run.workdir")
    manifest = {
        "stage": stage,
        "fingerprint": fp,
        "raylm_version": raylm.__version__,
        "config": _config_json(config),
        "inputs": prints,
    }
    writer = _write_in_place if storage.is_uri(final) else _write_and_rename
    with writer(final, manifest) as out:
        started = time.time()
        yield out
        manifest.update(stats=out.stats, seconds=round(time.time() - started, 2), finished_at=time.time())


@contextmanager
def _write_and_rename(final: str, manifest: dict) -> Iterator[StageOutput]:
    """On a disk: write `<final>.tmp-<id>`, put the manifest in, rename it to `final`."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        yield StageOutput(final, tmp, manifest)
        storage.write_text(storage.join(tmp, MANIFEST), json.dumps(manifest, indent=2))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _write_in_place(final: str, manifest: dict) -> Iterator[StageOutput]:
    """On an object store: clear the prefix, mark it unfinished, write, then write the manifest (the commit)."""
    storage.remove(storage.join(final, MANIFEST))  # first: from here on no reader trusts the prefix
    storage.remove(final)
    marker = storage.join(final, WRITING)
    storage.write_text(marker, json.dumps({"stage": manifest["stage"], "fingerprint": manifest["fingerprint"],
                                           "started_at": time.time()}))  # fmt: skip
    try:
        yield StageOutput(final, final, manifest)
    except BaseException:
        storage.remove(final)  # nothing half-written stays; if this fails too, the marker says it is unfinished
        raise
    storage.write_text(storage.join(final, MANIFEST), json.dumps(manifest, indent=2))
    storage.remove(marker)


def require_path(path: str | os.PathLike, what: str) -> str:
    """The location if it exists and can be read, else an InputError naming it."""
    p = str(path)
    if not storage.exists(p):
        raise InputError(f"{p}: {what} not found")
    if not storage.is_uri(p) and not os.access(p, os.R_OK):
        raise InputError(f"{p}: {what} is not readable")
    return p
