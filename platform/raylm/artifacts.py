"""Stage outputs: written under a temporary name, renamed when complete, with a manifest beside them.

Every stage writes its output directory through `stage_output`:

    with stage_output(cfg.output, "tokenize", cfg, inputs=[cfg.input], run=run) as out:
        if out.done:             # same config and inputs as the finished output: nothing to do
            return out.manifest
        ...write files under out.tmp...
        out.stats = {...}        # lands in manifest.json

The manifest holds the resolved stage config, a fingerprint of config + inputs, the
stats, and the raylm version. A killed run leaves only `<output>.tmp-*`, never a
directory that looks finished.
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
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

import raylm
from raylm.errors import InputError, RaylmError

MANIFEST = "manifest.json"


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of a finished stage output, or None when there is none."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def require_stage_output(path: str | os.PathLike, stage: str) -> dict:
    """The manifest of a finished `stage` output at `path`, or an InputError saying what to run first."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: not found (run `raylm {stage}` first, or point the config at its output)")
    manifest = read_manifest(p)
    if manifest is None:
        raise InputError(f"{p}: no {MANIFEST}; not a finished `raylm {stage}` output")
    if manifest.get("stage") != stage:
        raise InputError(f"{p}: written by `raylm {manifest.get('stage')}`, expected `raylm {stage}` output")
    return manifest


def fingerprint_inputs(paths: list[str]) -> dict[str, str]:
    """Per input path: the fingerprint from its manifest when it is a stage output, else a hash of file names, sizes and mtimes."""
    prints = {}
    for p in paths:
        manifest = read_manifest(p)
        if manifest is not None:
            prints[p] = manifest["fingerprint"]
            continue
        h = hashlib.sha256()
        root = Path(p)
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(root) if f != root else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        prints[p] = h.hexdigest()
    return prints


def _config_json(config: BaseModel | dict) -> Any:
    return json.loads(config.model_dump_json()) if isinstance(config, BaseModel) else config


def fingerprint(stage: str, config: BaseModel | dict, inputs: dict[str, str]) -> str:
    blob = json.dumps({"stage": stage, "config": _config_json(config), "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageOutput:
    path: Path
    tmp: Path
    manifest: dict
    done: bool = False
    stats: dict = field(default_factory=dict)


@contextmanager
def stage_output(
    path: str | os.PathLike,
    stage: str,
    config: BaseModel | dict,
    inputs: list[str] = (),
    overwrite: bool = False,
    input_prints: dict[str, str] | None = None,
) -> Iterator[StageOutput]:
    """Write a stage's output atomically; skip the work when a finished output has the same fingerprint.

    `input_prints` replaces the fingerprints of `inputs` for inputs that are not local files
    (object-store listings). An existing output from a different config is an error unless `overwrite`.
    """
    final = Path(path)
    prints = input_prints if input_prints is not None else fingerprint_inputs(list(inputs))
    fp = fingerprint(stage, config, prints)
    existing = read_manifest(final)
    if existing is not None and existing.get("fingerprint") == fp:
        yield StageOutput(final, final, existing, done=True)
        return
    if final.exists() and not overwrite:
        why = "from a different config or input" if existing else "and is not a finished raylm output"
        raise RaylmError(f"{final}: output exists {why}; set run.overwrite=true or choose another run.workdir")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    manifest = {
        "stage": stage,
        "fingerprint": fp,
        "raylm_version": raylm.__version__,
        "config": _config_json(config),
        "inputs": prints,
    }
    out = StageOutput(final, tmp, manifest)
    started = time.time()
    try:
        yield out
        manifest.update(stats=out.stats, seconds=round(time.time() - started, 2), finished_at=time.time())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary name in the same directory, then rename it into place."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, p)


def require_path(path: str | os.PathLike, what: str) -> Path:
    """The path if it exists and can be read, else an InputError naming it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: {what} not found")
    if not os.access(p, os.R_OK):
        raise InputError(f"{p}: {what} is not readable")
    return p
