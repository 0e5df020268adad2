"""Checkpoints of the train stage: when to take one, saving and restoring one, checking one before it is loaded.

A raylm checkpoint is the directory Ray Train keeps for one `ray.train.report` (see raylm.train.loop):

    <checkpoint>/deepspeed/latest, step<N>/*.pt   engine.save_checkpoint, every rank's files
    <checkpoint>/state.json                       step, model config, history, data position, tokenizer
    <checkpoint>/complete.json                    {"step": N}: every rank's files are in storage

Ray Train registers a reported checkpoint when its controller next polls the workers (every 2 s):
a worker killed in between leaves a checkpoint that every rank finished but Ray never registered,
and a restart from Ray's latest would lose those steps too. So once every rank's `report` has
returned, rank 0 writes complete.json, and a restart resumes from the newest complete checkpoint
in the run's storage when it is newer than Ray's (`resume_checkpoint`). Exporting a model from a
checkpoint is raylm.train.export's.

Loading never unpickles code. DeepSpeed 0.19.8 reads its files with `torch.load(..., weights_only=False)`
(TorchCheckpointEngine.load, and zero_to_fp32), which would run any `__reduce__` payload a tampered file
carries. So every file is first read by torch's weights-only unpickler, with DeepSpeed's own few state
classes allow-listed (`verify_deepspeed_checkpoint`); a file that needs anything else, or that is
truncated or unreadable, is refused with an InputError naming it, before DeepSpeed opens it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from pathlib import Path

import pyarrow.fs
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, Result

from raylm.errors import InputError, first_line
from raylm.train.ingest import DataPosition, DataState, SequenceOrder

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
DEEPSPEED_DIR = "deepspeed"
TOKENIZER_FILE = "tokenizer.json"
COMPLETE_FILE = "complete.json"


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers (ZeRO 0-3, bf16, fp16).

    Found by `torch.serialization.get_unsafe_globals_in_checkpoint` over checkpoints of every ZeRO stage in
    fp32 and bf16. Allow-listing a class lets the weights-only unpickler construct it and set its saved
    attributes; every other callable a pickle names (os.system, builtins.exec, ...) is still refused.
    """
    # DeepSpeed picks its accelerator when first imported: not at this module's import, on a driver or in a worker
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def checkpoint_tag(deepspeed_dir: Path) -> str:
    """The tag (`step<N>`) the DeepSpeed directory's `latest` file names; InputError if absent or dangling."""
    latest = deepspeed_dir / "latest"
    try:
        tag = latest.read_text().strip()
    except FileNotFoundError:
        raise InputError(f"{deepspeed_dir}: not a DeepSpeed checkpoint (no 'latest' file)") from None
    if not (deepspeed_dir / tag).is_dir():
        raise InputError(f"{latest}: names tag {tag!r}, but {deepspeed_dir / tag} does not exist")
    return tag


def safe_load(path: Path, *, mmap: bool = False):
    """`torch.load` of a DeepSpeed file with the weights-only unpickler; InputError naming `path` when refused."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch explains at length; the line naming the refused global is the one that matters
        lines = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()]
        why = lines[-1] if lines else str(e).strip().splitlines()[0]
        raise InputError(f"{path}: refused to load, it would unpickle code outside DeepSpeed's state classes ({why})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable checkpoint file, truncated or corrupt ({first_line(e)})") from None


def verify_deepspeed_checkpoint(deepspeed_dir: str | os.PathLike) -> str:
    """Read every file of the latest tag with the weights-only unpickler (memory-mapped: the pickles, not the tensor
    bytes); returns the tag. InputError naming the first file that is truncated, corrupt or carries code."""
    deepspeed_dir = Path(deepspeed_dir)
    tag = checkpoint_tag(deepspeed_dir)
    files = sorted((deepspeed_dir / tag).glob("*.pt"))
    if not files:
        raise InputError(f"{deepspeed_dir / tag}: no DeepSpeed checkpoint files (*.pt)")
    for path in files:
        safe_load(path, mmap=True)
    return tag


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> dict:
    """Check a raylm checkpoint directory before anything loads it; returns its state.json."""
    d = Path(checkpoint_dir)
    try:
        state = json.loads((d / STATE_FILE).read_text())
    except FileNotFoundError:
        raise InputError(f"{d}: not a raylm checkpoint (no {STATE_FILE})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{d / STATE_FILE}:{e.lineno}: invalid JSON ({e.msg})") from None
    verify_deepspeed_checkpoint(d / DEEPSPEED_DIR)
    return state


def latest_run_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a Ray Train run in the local `run_dir` (`<storage_path>/<name>`) resumes from; None for a new run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    registered = None
    if (run_dir / "checkpoint_manager_snapshot.json").exists():
        registered = Result.from_path(str(run_dir)).checkpoint
    checkpoint = resume_checkpoint(registered, pyarrow.fs.LocalFileSystem(), str(run_dir))
    return Path(checkpoint.path) if checkpoint is not None else None


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):  # missing (pyarrow raises FileNotFoundError, an OSError), partial or not JSON
        return None


def resume_checkpoint(registered, fs, run_path: str):
    """The checkpoint to resume from: Ray Train's latest registered one (`registered`, may be None), or the newest
    complete one under `run_path` on the pyarrow filesystem `fs` when that is at a later step."""
    best, best_step = registered, -1
    if registered is not None:
        state = _read_json(registered.filesystem, f"{registered.path}/{STATE_FILE}")
        best_step = int(state["step"]) if state else -1
    for entry in fs.get_file_info(pyarrow.fs.FileSelector(run_path, allow_not_found=True)):
        if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        marker = _read_json(fs, f"{entry.path}/{COMPLETE_FILE}")
        if marker is not None and int(marker["step"]) > best_step:
            best, best_step = Checkpoint(entry.path, filesystem=fs), int(marker["step"])
    return best


def mark_complete(checkpoint, step: int) -> bool:
    """Write complete.json into a persisted checkpoint once every rank's files are in (call after a barrier that
    follows every rank's report). False, writing nothing, when the checkpoint is not the one of `step`: Ray skips
    a report when a worker failed meanwhile, and the latest checkpoint is then an older one."""
    if checkpoint is None:
        return False
    state = _read_json(checkpoint.filesystem, f"{checkpoint.path}/{STATE_FILE}")
    if state is None or int(state["step"]) != step:
        return False
    with checkpoint.filesystem.open_output_stream(f"{checkpoint.path}/{COMPLETE_FILE}") as f:
        f.write(json.dumps({"step": step}).encode())
    return True


class CheckpointClock:
    """Decides when `interval_s` has passed since the last checkpoint, identically on every rank.

    Each rank's clock drifts and its steps end at slightly different times, so rank 0 decides and
    broadcasts its decision (one 1-element collective per call): every rank then saves at the same step.
    """

    def __init__(self, interval_s: float | None, device: torch.device):
        self.interval_s = interval_s
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        if self.interval_s is None:
            return False
        flag = torch.tensor([float(time.monotonic() - self.last >= self.interval_s)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())


# --- inside the workers: choose, read, restore and save ---------------------------------------------


def resume_from(registered, rank: int):
    """The checkpoint this attempt starts from (`resume_checkpoint` of Ray Train's `registered`), chosen by rank 0
    for all ranks (a collective)."""
    choice = [registered]
    if rank == 0:
        storage = ray.train.get_context().get_storage()
        choice = [resume_checkpoint(registered, storage.storage_filesystem, storage.experiment_fs_path)]
        if choice[0] is not None and (registered is None or choice[0].path != registered.path):
            logger.info(f"[raylm] resuming from {choice[0].path}: complete on every rank, not yet registered by Ray Train")
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def read_state(checkpoint, model: dict, order: SequenceOrder, rank: int) -> tuple[dict | None, DataState]:
    """state.json of the checkpoint this run resumes from (None for a fresh start) and where its data resumes.

    The position is the same on every rank. The sample checksum saved is all ranks' sum: rank 0
    carries it on, the others start from 0, so the sum over ranks continues unchanged.
    """
    if checkpoint is None:
        return None, DataState(DataPosition(), order)
    with checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
    if state["model"] != model:
        raise InputError(
            f"{checkpoint.path}: checkpoint of a different model ({state['model']}); "
            "choose another run name or remove the old run's storage"
        )
    saved, current = state["data"]["order"], order.to_dict()
    if saved != current:
        raise InputError(
            f"{checkpoint.path}: the checkpoint's data order {saved} differs from this run's {current}; "
            "resuming would repeat or skip samples (keep micro_batch_size, num_workers, seed and the data)"
        )
    checksum = int(state["data"]["sample_checksum"]) if rank == 0 else 0
    return state, DataState(DataPosition(**state["data"]["position"]), order, checksum)


def restore(engine, checkpoint, state: dict | None) -> int:
    """Load the engine from the checkpoint (model, optimizer, scheduler); returns its step (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        # DeepSpeed unpickles with weights_only=False: every file first passes torch's weights-only unpickler
        verify_deepspeed_checkpoint(Path(d) / DEEPSPEED_DIR)
        path, client_state = engine.load_checkpoint(str(Path(d) / DEEPSPEED_DIR))
    if path is None:
        raise InputError(f"{checkpoint.path}: DeepSpeed could not load the checkpoint")
    if int(client_state["step"]) != int(state["step"]):
        raise InputError(f"{checkpoint.path}: DeepSpeed files at step {client_state['step']}, state.json at {state['step']}")
    return int(client_state["step"])


def save(engine, directory: Path, step: int, state: dict | None, tokenizer_file: str | None = None) -> None:
    """This rank's part of the DeepSpeed checkpoint under `directory`; on rank 0 (`state` given) also state.json
    (step, model, history, data position) and the tokenizer, so that an intermediate checkpoint exports alone."""
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=f"step{step}", client_state={"step": step})
    if state is not None:
        (directory / STATE_FILE).write_text(json.dumps({"step": step, **state}))
        shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
