"""The layout of an exported-model directory, and its config.json.

    <dir>/model.safetensors   weights (no pickle)
    <dir>/config.json         {"format": "raylm-gpt", "version": 1, "model": GPTConfig fields,
                               "dtype": "float32" | "bfloat16", "quantization": null | {...}, ...}
    <dir>/tokenizer.json      the `tokenizers` tokenizer the model was trained with

Float models are written and loaded by raylm.model.artifact, int8 ones by raylm.model.quantized.
"""

from __future__ import annotations

import json
import os

from raylm import storage
from raylm.errors import InputError

FORMAT = "raylm-gpt"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def read_model_meta(directory: str | os.PathLike) -> dict:
    """config.json of an exported model (a local directory or a URI), or an InputError naming the directory."""
    d = str(directory)
    config = storage.join(d, CONFIG)
    try:
        meta = json.loads(storage.read_text(config))
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{d}: not an exported raylm model (no {CONFIG})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{config}:{e.lineno}: invalid JSON") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{config}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta
