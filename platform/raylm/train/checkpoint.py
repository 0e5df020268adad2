"""Checkpoints of the train stage: when to take one, checking one before it is loaded, exporting one.

A raylm checkpoint is the directory Ray Train keeps for one `ray.train.report` (see raylm.train.loop):

    <checkpoint>/deepspeed/latest, step<N>/*.pt   engine.save_checkpoint, every rank's files
    <checkpoint>/state.json                       step, model config, history, data position, tokenizer
    <checkpoint>/complete.json                    {"step": N}: every rank's files are in storage

Ray Train registers a reported checkpoint when its controller next polls the workers (every 2 s):
a worker killed in between leaves a checkpoint that every rank finished but Ray never registered,
and a restart from Ray's latest would lose those steps too. So once every rank's `report` has
returned, rank 0 writes complete.json, and a restart resumes from the newest complete checkpoint
in the run's storage when it is newer than Ray's (`resume_checkpoint`).

Loading never unpickles code. DeepSpeed 0.19.8 reads its files with `torch.load(..., weights_only=False)`
(TorchCheckpointEngine.load, and zero_to_fp32), which would run any `__reduce__` payload a tampered file
carries. So every file is first read by torch's weights-only unpickler, with DeepSpeed's own few state
classes allow-listed (`verify_deepspeed_checkpoint`); a file that needs anything else, or that is
truncated or unreadable, is refused with an InputError naming it, before DeepSpeed opens it.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import torch

from raylm.errors import InputError

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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: unreadable checkpoint file, truncated or corrupt ({first})") from None


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
    import pyarrow.fs
    from ray.train import Result

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
    from pyarrow.fs import FileSelector, FileType
    from ray.train import Checkpoint

    best, best_step = registered, -1
    if registered is not None:
        state = _read_json(registered.filesystem, f"{registered.path}/{STATE_FILE}")
        best_step = int(state["step"]) if state else -1
    for entry in fs.get_file_info(FileSelector(run_path, allow_not_found=True)):
        if entry.type != FileType.Directory or not entry.base_name.startswith("checkpoint_"):
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
        import torch.distributed as dist

        flag = torch.tensor([float(time.monotonic() - self.last >= self.interval_s)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())


def consolidated_state_dict(deepspeed_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a (verified) DeepSpeed checkpoint of any ZeRO stage, on the CPU, in one process.

    ZeRO 1-3: DeepSpeed's zero_to_fp32 joins the ranks' fp32 master partitions. ZeRO 0 keeps no partitions:
    the module's state dict is whole in the model-states file (fp32 runs); bf16/fp16 runs keep their fp32
    master copy in the optimizer state (`fp32_groups`), one list per optimizer param group.
    """
    import contextlib
    import io

    files = list((deepspeed_dir / tag).glob("*optim_states.pt"))
    if files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file
            state = get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_dir), tag=tag)
        return {k: v.float() for k, v in state.items()}
    model_states = safe_load(deepspeed_dir / tag / "mp_rank_00_model_states.pt")
    module = model_states["module"]
    masters = (model_states.get("optimizer") or {}).get("fp32_groups")
    full = {k: v.float() for k, v in module.items()}
    if masters:
        full.update(_match_masters(module, [t for group in masters for t in group], deepspeed_dir / tag))
    return full


def _match_masters(module: dict[str, torch.Tensor], masters: list[torch.Tensor], where: Path) -> dict:
    """Name each fp32 master tensor of a ZeRO-0 16-bit run after the module weight it was rounded to.

    The optimizer's groups hold the trainable parameters in an order of raylm's choosing
    (raylm.train.loop.build_optimizer), so no order is assumed: a master belongs to the first weight
    of its shape that equals it rounded to the weight's 16-bit dtype (the weights are exactly that).
    """
    pending = list(range(len(masters)))
    matched = {}
    for name, weight in module.items():
        for i in pending:
            if masters[i].shape == weight.shape and torch.equal(masters[i].to(weight.dtype), weight):
                matched[name] = masters[i].float()
                pending.remove(i)
                break
    if pending:
        raise InputError(f"{where}: {len(pending)} fp32 master tensors match no module weight")
    return matched


def export_checkpoint(
    checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32", tokenizer_file: str | None = None
) -> Path:
    """Write a raylm-gpt model directory from a raylm checkpoint (any ZeRO stage), on one CPU process, no Ray workers.

    checkpoint_dir: a Ray Train checkpoint of the train stage (state.json + deepspeed/).
    dtype: "float32" or "bfloat16" weights in model.safetensors.
    tokenizer_file: the tokenizer to ship with the model (default: the one saved in the checkpoint).
    Every file is verified (weights-only unpickling) before it is read.
    """
    from raylm.model.artifact import save_model
    from raylm.model.gpt import GPT, GPTConfig

    d = Path(checkpoint_dir)
    state = verify_checkpoint(d)
    tag = checkpoint_tag(d / DEEPSPEED_DIR)
    tokenizer = tokenizer_file or (d / TOKENIZER_FILE if (d / TOKENIZER_FILE).exists() else state.get("tokenizer_file"))
    if tokenizer is None or not Path(tokenizer).exists():
        raise InputError(f"{d}: the checkpoint names no tokenizer that exists ({tokenizer}); pass tokenizer_file")
    weights = consolidated_state_dict(d / DEEPSPEED_DIR, tag)
    model = GPT(GPTConfig.from_dict(state["model"]))
    expected = set(model.state_dict())
    weights.setdefault("lm_head.weight", weights.get("wte.weight"))  # tied to the embedding
    if set(weights) != expected:
        raise InputError(
            f"{d}: checkpoint weights do not fit the model of its state.json "
            f"(missing {sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]})"
        )
    model.load_state_dict(weights)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    extra = {"trained_steps": int(state["step"]), "exported_from": str(d.resolve())}
    return save_model(out_dir, model, tokenizer, eos_token_id=state.get("eos_token_id"), dtype=torch_dtype, extra=extra)
