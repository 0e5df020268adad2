"""Fine-tuning in the train stage: start from a trained model (train.init_from), LoRA (train.lora), SFT loss masks.

    train.init_from: runs/demo/train        continued pretraining / SFT from the demo model (its model/ dir; or a URI)
    train.lora: {rank: 8, alpha: 16}        only adapters train; the export merges them (raylm.model.lora)
    train.data: <tokenize.format sft output> targets are the completions alone (raylm.tokenize.sft)

The driver checks everything here before a worker starts: the base is an exported raylm-gpt
model, the token data was made with its tokenizer, `train.model` does not ask for another shape,
the LoRA targets exist. Each worker then builds the GPT, loads the base weights from safetensors
(`load_init_weights`), wraps the adapters, and hands the result to `deepspeed.initialize`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from raylm import storage
from raylm.errors import ConfigError, InputError
from raylm.model.artifact import CONFIG, TOKENIZER, WEIGHTS, read_model_meta
from raylm.model.gpt import GPT, GPTConfig
from raylm.model.lora import apply_lora
from raylm.tokenize.shards import TokenMeta, check_same_tokenizer
from raylm.train.config import TrainConfig

# train.model keys that leave the model's shape alone (everything else must match the base)
_SHAPE_FREE = {"dropout"}


def resolve_init_from(path: str, section: str = "train") -> str:
    """The exported model directory `path` names (a local path, made absolute, or a URI): itself, or the model/ of
    a train (or distill) stage output."""
    p = storage.absolute(path)
    for candidate in (p, storage.join(p, "model")):
        if storage.is_file(storage.join(candidate, CONFIG)):
            return candidate if storage.is_uri(candidate) else str(Path(candidate).resolve())
    if not storage.exists(p):
        raise InputError(f"{p}: not found ({section}.init_from)")
    raise InputError(f"{p}: neither an exported raylm model ({CONFIG}, {WEIGHTS}) nor a train output with model/ ({section}.init_from)")


def init_model_config(train_cfg: TrainConfig, meta: TokenMeta, section: str = "train") -> tuple[GPTConfig, str]:
    """(GPTConfig of the base model, with train.model's dropout; the base's directory), checked against the data."""
    base_dir = resolve_init_from(train_cfg.init_from, section)
    base_meta = read_model_meta(base_dir)
    if base_meta.get("quantization"):
        raise InputError(f"{base_dir}: a quantized model cannot be trained further ({section}.init_from); use its fp32 source")
    if not storage.is_file(storage.join(base_dir, WEIGHTS)):
        raise InputError(f"{base_dir}: no {WEIGHTS} ({section}.init_from)")
    base = GPTConfig.from_dict(base_meta["model"])
    check_same_tokenizer(meta, storage.join(base_dir, TOKENIZER), f"{section}.init_from model {base_dir}")
    m = train_cfg.model
    if m.model_fields_set - _SHAPE_FREE:  # train.model asks for something: it must be the base's shape
        try:
            asked = m.gpt_config(vocab_size=base.vocab_size, block_size=base.block_size)
        except ValueError as e:
            raise ConfigError(f"{section}.model: {e}") from None
        keys = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in _SHAPE_FREE]
        differ = [f"{k}={getattr(asked, k)!r} (base: {getattr(base, k)!r})" for k in keys if getattr(asked, k) != getattr(base, k)]
        if differ:
            raise ConfigError(
                f"{section}.model: {', '.join(differ)} conflicts with {section}.init_from {base_dir}; "
                f"the model's shape comes from the base: leave {section}.model unset (dropout may change)"
            )
    return dataclasses.replace(base, dropout=m.dropout), base_dir


def check_finetune(train_cfg: TrainConfig, meta: TokenMeta, gpt: GPTConfig, section: str = "train") -> None:
    """ConfigError when LoRA or the SFT loss masks cannot apply to this run (checked on the driver)."""
    if train_cfg.lora is not None:
        with torch.device("meta"):  # no memory: only which layers exist matters
            try:
                apply_lora(GPT(gpt), train_cfg.lora.rank, train_cfg.lora.alpha, train_cfg.lora.targets)
            except ValueError as e:
                raise ConfigError(f"{section}.lora.targets: {e}") from None
        if getattr(train_cfg, "pipeline_stages", 1) > 1:
            raise ConfigError(f"{section}.lora: LoRA runs without pipeline stages (set {section}.pipeline_stages=1)")
    if train_cfg.init_from and getattr(train_cfg, "pipeline_stages", 1) > 1:
        raise ConfigError(f"{section}.init_from: starting from a trained model runs without pipeline stages (set {section}.pipeline_stages=1)")
    if meta.loss_mask:
        if getattr(train_cfg, "objective", "causal") != "causal":
            raise ConfigError(f"{section}.objective: token data with loss masks (SFT, {meta.location}) needs the causal objective")
        if getattr(train_cfg, "pipeline_stages", 1) > 1:
            raise ConfigError(f"{section}.pipeline_stages: token data with loss masks (SFT, {meta.location}) trains without pipeline stages")


def load_init_weights(model: GPT, model_dir: str | Path) -> None:
    """Copy an exported model's weights (safetensors, fp32 or bf16 on disk) into `model`, whose shape must match.

    A model on an object store is read from this node's copy (downloaded once per node)."""
    state = load_file(str(Path(storage.local_copy(model_dir)) / WEIGHTS))
    state["lm_head.weight"] = state["wte.weight"]  # tied: stored once
    model.load_state_dict({k: v.float() for k, v in state.items()})


def prepare_finetune(
    train_cfg: TrainConfig, meta: TokenMeta, gpt: GPTConfig, export_extra: dict | None, section: str = "train"
) -> tuple[TrainConfig, dict]:
    """The checks above, then (train config with init_from as an absolute model directory for the workers,
    export_extra with what the exported config.json records: the base model and the merged adapters)."""
    check_finetune(train_cfg, meta, gpt, section)
    extra = dict(export_extra or {})
    if train_cfg.init_from:
        base_dir = resolve_init_from(train_cfg.init_from, section)
        train_cfg = train_cfg.model_copy(update={"init_from": str(base_dir)})
        extra["init_from"] = str(base_dir)
    if train_cfg.lora is not None:
        extra["lora"] = {**train_cfg.lora.model_dump(mode="json"), "merged": True}
    if meta.loss_mask:
        extra["sft_data"] = meta.location
    return train_cfg, extra
