"""Model directories from training state: the trained engine exported at the end of a run, or a checkpoint on disk.

    <checkpoint>/model/                        the final checkpoint's export: a raylm-gpt model directory
                                               (model.safetensors, config.json, tokenizer.json), LoRA merged
    <checkpoint>/export_probe.safetensors      the engine's logits on one validation row, to check the export against

`export_engine` runs inside the workers (a collective: ZeRO and pipeline stages hold parts of the
weights); `export_checkpoint` (`raylm export`) does the same from a checkpoint directory, in one process.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from raylm.errors import InputError
from raylm.model.artifact import load_model, save_model
from raylm.model.gpt import GPT, GPTConfig
from raylm.model.lora import apply_lora, merge_lora
from raylm.train.checkpoint import DEEPSPEED_DIR, TOKENIZER_FILE, checkpoint_tag, safe_load, verify_checkpoint
from raylm.train.config import LoraConfig
from raylm.train.pipeline_parallel import full_state_dict, probe_logits

MODEL_DIR = "model"
PROBE_FILE = "export_probe.safetensors"


@dataclass(frozen=True)
class ExportSpec:
    """What an exported model directory holds besides the trained weights."""

    model: dict
    """GPTConfig fields of the trained model."""
    tokenizer_file: str
    eos_token_id: int
    run_name: str
    dtype: str = "float32"
    """Weight dtype of model.safetensors (train.export_dtype)."""
    lora: LoraConfig | None = None
    """The adapters the engine trained, merged into the weights on export."""
    extra: dict = field(default_factory=dict)
    """Extra keys for config.json (e.g. what a student was distilled from)."""


def export_engine(
    engine, spec: ExportSpec, step: int, probe: torch.Tensor, directory: Path, pipeline_stages: int = 1
) -> None:
    """The engine's consolidated fp32 weights as a raylm-gpt model dir under `directory` (world rank 0), plus its
    logits on `probe` (1, T). A collective: every rank calls it, plain and pipeline engines alike.

    `safe_get_full_fp32_param` assembles each parameter from the optimizer's fp32 master copy (ZeRO 1-3,
    bf16), so every rank walks the parameters in the same order; under ZeRO-3 the forward is a collective too.
    """
    from deepspeed.utils import safe_get_full_fp32_param  # imported in the workers only, after DS_ACCELERATOR

    if pipeline_stages > 1:
        full = full_state_dict(engine, GPTConfig.from_dict(spec.model))
        logits = probe_logits(engine, probe)
        if full is not None:  # world rank 0
            write_export(spec, step, full, probe, logits, directory, extra={"pipeline_stages": pipeline_stages})
        return
    rank = dist.get_rank()
    full = {}
    for name, param in engine.module.named_parameters():
        value = safe_get_full_fp32_param(param)
        if value is None:  # ZeRO 0 in fp32: the module holds the whole fp32 weight itself
            value = param.detach()
        if rank == 0:
            full[name] = value.detach().float().cpu().clone()
    with torch.no_grad():
        engine.eval()
        logits, _ = engine(probe)  # a collective under ZeRO-3
        engine.train()
    if rank == 0:
        write_export(spec, step, full, probe, logits, directory)


def write_export(
    spec: ExportSpec, step: int, full: dict[str, torch.Tensor], probe: torch.Tensor, logits: torch.Tensor,
    directory: Path, extra: dict | None = None,
) -> None:
    """Rank 0's half of an export: the gathered fp32 weights `full` (the engine's parameter names) as a raylm-gpt
    model dir in `spec.dtype`, LoRA merged, and the engine's `logits` on `probe` beside it."""
    model = GPT(GPTConfig.from_dict(spec.model))
    lora = spec.lora
    if lora is not None:  # the engine's parameter names: the frozen base weights and the adapters
        apply_lora(model, lora.rank, lora.alpha, lora.targets)
    missing = {name for name, _ in model.named_parameters()} - set(full)
    if missing:
        raise RuntimeError(f"export: parameters missing from the engine: {sorted(missing)}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(full[name])
    if lora is not None:
        model = merge_lora(model, inplace=True)  # W + (alpha / rank) * B @ A: a plain raylm-gpt model
    meta = {"trained_steps": step, "run_name": spec.run_name, **(extra or {}), **spec.extra}
    save_model(directory / MODEL_DIR, model, spec.tokenizer_file, eos_token_id=spec.eos_token_id, extra=meta,
               dtype=getattr(torch, spec.dtype))  # fmt: skip
    probe_tensors = {"input_ids": probe.cpu().contiguous(), "logits": logits.float().cpu().contiguous()}
    save_file(probe_tensors, str(directory / PROBE_FILE))


def export_check(model_dir: Path, probe: dict) -> float:
    """Largest |difference| between the exported model's logits and the trained engine's on the probe row."""
    loaded = load_model(model_dir)
    with torch.no_grad():
        logits, _ = loaded.model(probe["input_ids"])
    return float((logits - probe["logits"]).abs().max())


def consolidated_state_dict(deepspeed_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a (verified) DeepSpeed checkpoint of any ZeRO stage, on the CPU, in one process.

    ZeRO 1-3: DeepSpeed's zero_to_fp32 joins the ranks' fp32 master partitions. ZeRO 0 keeps no partitions:
    the module's state dict is whole in the model-states file (fp32 runs); bf16/fp16 runs keep their fp32
    master copy in the optimizer state (`fp32_groups`), one list per optimizer param group.
    """
    files = list((deepspeed_dir / tag).glob("*optim_states.pt"))
    if files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # DeepSpeed: only here

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
    (raylm.train.optim.build_optimizer), so no order is assumed: a master belongs to the first weight
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
