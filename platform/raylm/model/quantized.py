"""The int8 model artifact: a GPT whose Linear layers hold int8 weights, on disk and in memory.

    <dir>/model.safetensors   for each quantized Linear `<name>`:
                                <name>.weight_int8        int8 (out, in)
                                <name>.weight_scale       float32 (out,)   one scale per output channel
                                <name>.weight_zero_point  int32 (out,)     all zero: symmetric quantization
                                <name>.bias               float32 (out,)   when the layer has one
                              everything else (embeddings, norms) in float32
    <dir>/config.json         as `raylm.model.artifact`, with
                              "quantization": {"method": "int8_dynamic", "modules": [...], ...}
    <dir>/tokenizer.json

Weights are quantized per output channel and symmetrically: w ≈ scale[o] * q[o, i] with q in
[-127, 127]. At run time each quantized Linear is a `torch.ao.nn.quantized.dynamic.Linear`
(fbgemm/qnnpack int8 kernels on the CPU): activations are quantized on the fly per batch.
Those kernels are CPU-only, so an int8 model runs on the CPU.

The model in memory after `quantize_gpt` and the one `load_quantized` rebuilds are made by the
same function from the same int8 tensors and scales, so they compute identical logits.

The GPT ties `lm_head.weight` to the token embedding. By default lm_head stays tied and in
float32 (the embedding is a lookup table, not a Linear); with `lm_head=True` it becomes an int8
Linear of its own while the embedding stays float32, which unties them (see QuantizeConfig).
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
from raylm.model.artifact import CONFIG, FORMAT, FORMAT_VERSION, TOKENIZER, WEIGHTS
from raylm.model.gpt import GPT, GPTConfig

METHOD = "int8_dynamic"
QMAX = 127  # symmetric int8: [-127, 127], so that -q is representable for every q

INT8, SCALE, ZERO_POINT = "weight_int8", "weight_scale", "weight_zero_point"


@contextlib.contextmanager
def _quiet_quantized_dtypes():
    """Silence torch 2.13's deprecation notices for qint8 tensors and torch.ao.quantization.

    The kernels still work in the pinned torch; the on-disk format (plain int8 + float32
    scales) does not depend on them, so moving to another int8 kernel later changes only
    `int8_linear`.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        yield


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 (out, in), float32 scale (out,)), symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale does
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_linear(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A dynamically quantized Linear from its int8 weight (out, in), per-channel scale and zero point (out,)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    out_features, in_features = q.shape
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


def linear_names(model: GPT, lm_head: bool) -> list[str]:
    """Names of the Linear layers to quantize: every block's, plus lm_head when asked."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    return names + ["lm_head"] if lm_head else names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_gpt(model: GPT, lm_head: bool = False) -> GPT:
    """A copy of `model` (float, eval mode) with int8 Linear layers; lm_head too when `lm_head`."""
    qmodel = GPT(model.config)
    qmodel.load_state_dict(model.state_dict())
    names = linear_names(qmodel, lm_head)
    for name in names:
        linear = qmodel.get_submodule(name)
        q, scale = quantize_weight(linear.weight)
        _set_module(qmodel, name, int8_linear(q, scale, torch.zeros_like(scale, dtype=torch.int32), linear.bias))
    qmodel.quantized_modules = names
    return qmodel.eval()


def quantized_state(qmodel: GPT) -> dict[str, torch.Tensor]:
    """Everything to store: int8 tensors of the quantized Linears, float32 for the rest (lm_head once when tied)."""
    state = {}
    for name in qmodel.quantized_modules:
        for key, t in int8_tensors(qmodel.get_submodule(name)).items():
            state[f"{name}.{key}"] = t
    for key, t in qmodel.state_dict().items():
        if not isinstance(t, torch.Tensor) or key.startswith(tuple(f"{n}." for n in qmodel.quantized_modules)):
            continue  # packed params of the quantized layers: stored above as plain int8
        if key == "lm_head.weight":
            continue  # tied to wte.weight; safetensors refuses shared storage
        state[key] = t.detach().float().contiguous()
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
    lm_head = "lm_head" in qmodel.quantized_modules
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
            "lm_head": "int8 (untied from wte)" if lm_head else "float32 (tied to wte)",
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
    state = load_file(str(d / WEIGHTS))
    modules = list(quant.get("modules") or [])
    layers = {}
    for name in modules:
        try:
            q, scale, zp = (state.pop(f"{name}.{key}") for key in (INT8, SCALE, ZERO_POINT))
        except KeyError:
            raise InputError(f"{d / WEIGHTS}: no int8 weights for {name!r} listed in config.json") from None
        layers[name] = int8_linear(q, scale, zp, state.pop(f"{name}.bias", None))
    if "lm_head" not in modules:
        state["lm_head.weight"] = state["wte.weight"]
    # Load the float tensors into a float GPT, then swap in the int8 layers.
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in layers]
    if missing or unexpected:
        raise InputError(f"{d / WEIGHTS}: missing tensors {missing[:3]}, unexpected {unexpected[:3]}")
    for name, layer in layers.items():
        _set_module(model, name, layer)
    model.quantized_modules = modules
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    """Weights of a float or int8 model, each shared tensor once (int8 Linear weights count one per element)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    for name in getattr(model, "quantized_modules", ()):
        with _quiet_quantized_dtypes():
            weight, bias = model.get_submodule(name)._weight_bias()
        total += weight.numel() + (bias.numel() if bias is not None else 0)
    return total
