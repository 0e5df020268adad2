"""The int8 model artifact: a GPT whose weight matrices are int8, on disk and in memory.

    <dir>/model.safetensors   for each quantized Linear `<name>`:
                                <name>.weight_int8        int8 (out, in)
                                <name>.weight_scale       float32 (out,)   one scale per output channel
                                <name>.weight_zero_point  int32 (out,)     all zero: symmetric quantization
                                <name>.bias               float32 (out,)   when the layer has one
                              with an int8 tied embedding also
                                wte.weight_int8           int8 (vocab, d_model)
                                wte.weight_scale          float32 (vocab,)  one scale per row
                              everything else (positions, norms) in float32
    <dir>/config.json         as `raylm.model.layout`, with
                              "quantization": {"method": "int8_dynamic", "modules": [...],
                                               "tied_embedding": "float32" | "int8", ...}
    <dir>/tokenizer.json

Weights are quantized per output channel and symmetrically: w ≈ scale[o] * q[o, i] with q in
[-127, 127]. At run time each quantized Linear is a `torch.ao.nn.quantized.dynamic.Linear`
(fbgemm/qnnpack int8 kernels on the CPU): activations are quantized on the fly per batch.
Those kernels are CPU-only, so an int8 model runs on the CPU.

The GPT ties its output projection (lm_head) to the token embedding. With
tied_embedding="float32" both stay one float32 matrix. With "int8" one int8 table with a
scale per row serves both: the embedding looks up and dequantizes the rows it needs, and
lm_head is an int8 Linear built from the same table (a row of the embedding is an output
channel of lm_head), so the tie survives and the table is stored once.

The model in memory after `quantize_gpt` and the one `load_quantized` rebuilds are made by the
same functions from the same int8 tensors and scales, so they compute identical logits.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from raylm.errors import InputError
from raylm.model.layout import CONFIG, FORMAT, FORMAT_VERSION, TOKENIZER, WEIGHTS
from raylm.model.gpt import GPT, GPTConfig

METHOD = "int8_dynamic"
QMAX = 127  # symmetric int8: [-127, 127], so that -q is representable for every q
TIED_EMBEDDING = ("float32", "int8")

INT8, SCALE, ZERO_POINT = "weight_int8", "weight_scale", "weight_zero_point"


@contextlib.contextmanager
def _quiet_quantized_dtypes():
    """Silence torch 2.13's deprecation notices for qint8 tensors and torch.ao.quantization.

    The kernels still work in the pinned torch; the on-disk format (plain int8 + float32
    scales) does not depend on them, so moving to another int8 kernel later changes only
    `int8_linear` and `int8_tensors`.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        yield


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 (out, in), float32 scale (out,)), symmetric per output channel (row)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale does
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_linear(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bias: torch.Tensor | None) -> nn.Module:
    """A dynamically quantized Linear from its int8 weight (out, in), per-channel scale and zero point (out,)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear  # torch.ao warns of its deprecation on import

    out_features, in_features = q.shape
    if zero_point is None:
        zero_point = torch.zeros(out_features, dtype=torch.int64)
    with _quiet_quantized_dtypes():
        qweight = torch._make_per_channel_quantized_tensor(
            q.to(torch.int8), scale.to(torch.float64), zero_point.to(torch.int64), 0
        )
        layer = DynamicQuantizedLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(qweight, None if bias is None else bias.detach().float())
    return layer


def int8_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The stored tensors of a dynamically quantized Linear: int8 weight, scale, zero point, bias."""
    with _quiet_quantized_dtypes():
        qweight, bias = layer._weight_bias()
        tensors = {
            INT8: qweight.int_repr().contiguous(),
            SCALE: qweight.q_per_channel_scales().float().contiguous(),
            ZERO_POINT: qweight.q_per_channel_zero_points().to(torch.int32).contiguous(),
        }
    if bias is not None:
        tensors["bias"] = bias.detach().float().contiguous()
    return tensors


class Int8Embedding(nn.Module):
    """A token embedding stored as int8 rows with one float32 scale per row; only looked-up rows are dequantized."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer(INT8, q.to(torch.int8).contiguous())  # (V, C)
        self.register_buffer(SCALE, scale.float().contiguous())  # (V,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # (B, T) ids -> (B, T, C) float32
        return getattr(self, INT8)[idx].float() * getattr(self, SCALE)[idx].unsqueeze(-1)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _tie_int8(model: GPT, q: torch.Tensor, scale: torch.Tensor) -> None:
    """One int8 table for the token embedding and lm_head."""
    model.wte = Int8Embedding(q, scale)
    model.lm_head = int8_linear(q, scale, None, None)


def quantize_gpt(model: GPT, tied_embedding: str = "int8") -> GPT:
    """A copy of `model` (float, eval mode) with every block's Linear in int8; the tied embedding too when "int8"."""
    if tied_embedding not in TIED_EMBEDDING:
        raise ValueError(f"tied_embedding must be one of {TIED_EMBEDDING}, got {tied_embedding!r}")
    qmodel = GPT(model.config)
    qmodel.load_state_dict(model.state_dict())
    names = [name for name, m in qmodel.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    for name in names:
        linear = qmodel.get_submodule(name)
        q, scale = quantize_weight(linear.weight)
        _set_module(qmodel, name, int8_linear(q, scale, None, linear.bias))
    if tied_embedding == "int8":
        _tie_int8(qmodel, *quantize_weight(qmodel.wte.weight))
    qmodel.quantized_modules = names
    qmodel.tied_embedding = tied_embedding
    return qmodel.eval()


def quantized_state(qmodel: GPT) -> dict[str, torch.Tensor]:
    """Everything to store: int8 tensors of the quantized layers, float32 for the rest, the tied matrix once."""
    state = {}
    for name in qmodel.quantized_modules:
        for key, t in int8_tensors(qmodel.get_submodule(name)).items():
            state[f"{name}.{key}"] = t
    # lm_head is tied to the embedding (float32 or int8): safetensors refuses shared storage, and the
    # int8 lm_head is rebuilt from the int8 embedding, so it is never stored itself.
    skip = tuple(f"{n}." for n in [*qmodel.quantized_modules, "lm_head"])
    for key, t in qmodel.state_dict().items():
        if isinstance(t, torch.Tensor) and not key.startswith(skip):
            state[key] = (t.float() if t.is_floating_point() else t).detach().contiguous()
    return state


def save_quantized(
    directory: str | os.PathLike,
    qmodel: GPT,
    tokenizer_file: str | os.PathLike,
    *,
    source_meta: dict | None = None,
) -> Path:
    """Write a quantized GPT (from `quantize_gpt`) as an int8 raylm-gpt directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(quantized_state(qmodel), str(d / WEIGHTS), metadata={"format": FORMAT, "quantization": METHOD})
    source_meta = source_meta or {}
    meta = {
        **source_meta,
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": qmodel.config.to_dict(),
        "dtype": "int8",
        "quantization": {
            "method": METHOD,
            "weight_dtype": "int8",
            "granularity": "per_channel",
            "symmetric": True,
            "activations": "dynamic",
            "tied_embedding": qmodel.tied_embedding,
            "modules": list(qmodel.quantized_modules),
            "engine": torch.backends.quantized.engine,
        },
        "eos_token_id": source_meta.get("eos_token_id"),
        "num_params": count_parameters(qmodel),
    }
    (d / CONFIG).write_text(json.dumps(meta, indent=2))
    if Path(tokenizer_file).resolve() != (d / TOKENIZER).resolve():
        shutil.copyfile(tokenizer_file, d / TOKENIZER)
    return d


def load_quantized(directory: str | os.PathLike, cfg: GPTConfig, meta: dict) -> GPT:
    """Rebuild the int8 GPT stored in `directory` (called by `raylm.model.artifact.load_model`)."""
    d = Path(directory)
    quant = meta.get("quantization") or {}
    if quant.get("method") != METHOD:
        raise InputError(f"{d / CONFIG}: quantization method {quant.get('method')!r} is not {METHOD!r}")
    tied = quant.get("tied_embedding", "float32")
    if tied not in TIED_EMBEDDING:
        raise InputError(f"{d / CONFIG}: quantization.tied_embedding {tied!r} is not one of {TIED_EMBEDDING}")
    state = load_file(str(d / WEIGHTS))
    modules = list(quant.get("modules") or [])
    layers = {}
    for name in modules:
        try:
            q, scale, zp = (state.pop(f"{name}.{key}") for key in (INT8, SCALE, ZERO_POINT))
        except KeyError:
            raise InputError(f"{d / WEIGHTS}: no int8 weights for {name!r} listed in config.json") from None
        layers[name] = int8_linear(q, scale, zp, state.pop(f"{name}.bias", None))
    if tied == "int8":
        try:
            embedding = state.pop(f"wte.{INT8}"), state.pop(f"wte.{SCALE}")
        except KeyError:
            raise InputError(f"{d / WEIGHTS}: no int8 token embedding (wte.{INT8}, wte.{SCALE})") from None
    else:
        state["lm_head.weight"] = state["wte.weight"]
    # Load the float tensors into a float GPT, then swap in the int8 layers.
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    replaced = set(layers) | ({"wte", "lm_head"} if tied == "int8" else set())
    missing = [k for k in missing if k.rpartition(".")[0] not in replaced]
    if missing or unexpected:
        raise InputError(f"{d / WEIGHTS}: missing tensors {missing[:3]}, unexpected {unexpected[:3]}")
    for name, layer in layers.items():
        _set_module(model, name, layer)
    if tied == "int8":
        _tie_int8(model, *embedding)
    model.quantized_modules = modules
    model.tied_embedding = tied
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    """Weights of a float or int8 GPT, a tied matrix once (an int8 weight counts one per element)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    for name in getattr(model, "quantized_modules", ()):
        with _quiet_quantized_dtypes():
            weight, bias = model.get_submodule(name)._weight_bias()
        total += weight.numel() + (bias.numel() if bias is not None else 0)
    if isinstance(getattr(model, "wte", None), Int8Embedding):
        total += getattr(model.wte, INT8).numel()  # lm_head shares it
    return total
