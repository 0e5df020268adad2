"""The quantize stage: an exported model -> the same model with int8 Linear weights, exported again.

    raylm quantize --config configs/demo.yaml [--quantize.tied_embedding=float32]

Reads `quantize.input` (an exported raylm-gpt directory, the train stage's output/model by
default) and writes `quantize.output/model` in the int8 format of `raylm.model.quantized`,
loadable by `raylm.model.artifact.load_model` like any exported model. Quantization is a
few seconds of CPU work on the driver; there is nothing to distribute.

Before the output is published the stage reloads it from disk and checks that it computes
exactly the logits of the model it quantized in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from raylm.artifacts import require_path, stage_output
from raylm.compress.config import QuantizeConfig
from raylm.context import RunContext
from raylm.errors import InputError, RaylmError
from raylm.model.artifact import TOKENIZER, WEIGHTS, load_model, read_model_meta
from raylm.model.quantized import count_parameters, quantize_gpt, save_quantized
from raylm.storage import is_file, join, local_dir

PROBE_TOKENS = 64  # tokens per row of the random batch comparing float and int8 logits


def check_source(path: str | os.PathLike) -> dict:
    """config.json of the float model to quantize, or an InputError naming what is wrong with it."""
    d = require_path(path, "model to quantize (quantize.input)")
    meta = read_model_meta(d)
    for name in (WEIGHTS, TOKENIZER):
        if not is_file(join(d, name)):
            raise InputError(f"{d}: not an exported raylm model (no {name})")
    if meta.get("quantization"):
        method = meta["quantization"].get("method") if isinstance(meta["quantization"], dict) else meta["quantization"]
        raise InputError(f"{d}: already quantized ({method}); point quantize.input at a float model")
    return meta


@torch.inference_mode()
def compare_logits(reference: torch.nn.Module, other: torch.nn.Module, vocab_size: int, block_size: int, seed: int) -> dict:
    """Max |logit difference| and top-1 agreement of two models on a seeded random batch (2, T)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(vocab_size, (2, min(block_size, PROBE_TOKENS)), generator=g)
    a, _ = reference(idx)
    b, _ = other(idx)
    return {
        "max_abs_logit_diff": float((a - b).abs().max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


def run_quantize(qcfg: QuantizeConfig, ctx: RunContext) -> dict:
    """The quantize stage: `qcfg.input` to int8, written to `qcfg.output/model`; returns a summary."""
    check_source(qcfg.input)
    with stage_output(qcfg.output, "quantize", qcfg, inputs=[qcfg.input], overwrite=ctx.overwrite) as out:
        if not out.done:
            with local_dir(out.file("model")) as target:  # on an object store: written locally, then uploaded
                out.stats = _quantize(qcfg.input, target, tied_embedding=qcfg.tied_embedding, seed=ctx.seed)
    stats = out.manifest.get("stats") or out.stats
    return {"output": out.path, "model": join(out.path, "model"), **stats}


def _quantize(source: str | os.PathLike, target: Path, *, tied_embedding: str, seed: int) -> dict:
    loaded = load_model(source)
    qmodel = quantize_gpt(loaded.model, tied_embedding=tied_embedding)
    save_quantized(target, qmodel, loaded.path / TOKENIZER, source_meta={**loaded.meta, "source": str(source)})
    reloaded = load_model(target).model
    c = loaded.config
    if compare_logits(qmodel, reloaded, c.vocab_size, c.block_size, seed)["max_abs_logit_diff"] != 0.0:
        raise RaylmError(f"{target}: the reloaded int8 model does not reproduce the quantized model's logits")
    before = (loaded.path / WEIGHTS).stat().st_size
    after = (target / WEIGHTS).stat().st_size
    return {
        "method": "int8_dynamic",
        "tied_embedding": tied_embedding,
        "quantized_modules": len(qmodel.quantized_modules),
        "num_params": count_parameters(qmodel),
        "size_bytes_before": before,
        "size_bytes_after": after,
        "size_ratio": round(after / before, 4),
        **compare_logits(loaded.model, qmodel, c.vocab_size, c.block_size, seed),
    }
