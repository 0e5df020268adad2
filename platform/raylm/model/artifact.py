"""Exported models: what train, distill and quantize write and evaluate and serve read.

    save_model(dir, gpt, tokenizer_file)     a float model directory (layout: raylm.model.layout)
    load_model(dir) -> LoadedModel           any exported model, float or int8 (raylm.model.quantized)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from raylm.model.gpt import GPT, GPTConfig
from raylm.model.layout import CONFIG, FORMAT, FORMAT_VERSION, TOKENIZER, WEIGHTS, read_model_meta  # noqa: F401 (named here too)
from raylm.model.quantized import load_quantized
from raylm.storage import local_copy


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: GPTConfig
    tokenizer: Any  # tokenizers.Tokenizer
    meta: dict
    path: Path

    @property
    def eos_token_id(self) -> int | None:
        return self.meta.get("eos_token_id")


def save_model(
    directory: str | os.PathLike,
    model: GPT,
    tokenizer_file: str | os.PathLike,
    *,
    eos_token_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    extra: dict | None = None,
) -> Path:
    """Write `model` as a raylm-gpt directory (created; contents replaced)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Tied embeddings share storage; safetensors refuses shared tensors, so store lm_head once as wte.
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(d / WEIGHTS), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": None,
        "eos_token_id": eos_token_id,
        "num_params": model.num_params(non_embedding=False),
        **(extra or {}),
    }
    (d / CONFIG).write_text(json.dumps(meta, indent=2))
    if Path(tokenizer_file).resolve() != (d / TOKENIZER).resolve():
        shutil.copyfile(tokenizer_file, d / TOKENIZER)
    return d


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an exported model for inference (eval mode). Reads safetensors only: nothing is unpickled."""
    d = Path(local_copy(directory))  # a model on an object store: this node's copy, downloaded once
    meta = read_model_meta(d)
    cfg = GPTConfig.from_dict(meta["model"])
    if meta.get("quantization"):
        model = load_quantized(d, cfg, meta)  # int8 weights: built by raylm.compress.quantize
    else:
        model = GPT(cfg)
        state = load_file(str(d / WEIGHTS))
        state["lm_head.weight"] = state["wte.weight"]
        model.load_state_dict({k: v.float() for k, v in state.items()})
    model.to(device).eval()
    tokenizer = Tokenizer.from_file(str(d / TOKENIZER))
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, meta=meta, path=d)
