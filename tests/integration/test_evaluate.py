"""The evaluate stage on a local Ray: tiny float and int8 models scored on token shards made here."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raylm.artifacts import stage_output
from raylm.config import load_config
from raylm.errors import InputError
from raylm.model.artifact import save_model
from raylm.model.gpt import GPT, build_config
from raylm.model.quantized import quantize_gpt, save_quantized
from raylm.tokenize.packing import packed_split
from raylm.tokenize.shards import write_token_data
from raylm.stages import run_stage

SEQ_LEN = 32
TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
)


def make_tokens(root) -> tuple[str, int]:
    """A finished tokenize output: a real byte-level BPE tokenizer and packed train/validation shards."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 8, trainer)
    eos = tok.token_to_id("<|endoftext|>")
    vocab = tok.get_vocab_size()
    path = root / "tokens"
    with stage_output(path, "tokenize", {"test": True}) as out:
        doc = tok.encode(TEXT).ids
        splits = {split: packed_split([doc] * 6, eos, SEQ_LEN) for split in ("train", "validation")}
        out.stats = write_token_data(out.tmp, tok, eos, splits).to_stats()
    return str(path), vocab


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    tokens, vocab = make_tokens(root)
    torch.manual_seed(0)
    big = GPT(build_config("debug", vocab_size=vocab, block_size=64)).eval()
    small = GPT(build_config(None, n_layer=1, n_head=2, d_model=32, vocab_size=vocab, block_size=64)).eval()
    tokenizer = f"{tokens}/tokenizer.json"
    paths = {
        "base": save_model(root / "base", big, tokenizer),
        "small": save_model(root / "small", small, tokenizer),
        "base-int8": save_quantized(root / "base-int8", quantize_gpt(big), tokenizer),
    }
    return root, tokens, {k: str(v) for k, v in paths.items()}


def config(root, tokens, models: dict, name: str = "evaluate"):
    overrides = [
        "--prepare.input=x",
        f"--run.workdir={root}",
        f"--evaluate.data={tokens}",
        f"--evaluate.output={root / name}",
        "--evaluate.models=" + json.dumps(models),
        "--evaluate.max_batches=2",
        "--evaluate.batch_size=4",
        "--evaluate.speed_prompt_tokens=8",
        "--evaluate.speed_new_tokens=8",
        "--evaluate.speed_repeats=1",
        "--evaluate.num_threads=1",
    ]
    return load_config(None, overrides)


def test_evaluate_writes_a_row_per_model(ray_local, workspace):
    root, tokens, models = workspace
    summary = run_stage("evaluate", config(root, tokens, models))
    results = json.loads((root / "evaluate" / "results.json").read_text())
    rows = {r["name"]: r for r in results["models"]}
    assert list(rows) == ["base", "small", "base-int8"]
    for r in rows.values():
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert math.isfinite(r["bits_per_byte"]) and r["bits_per_byte"] > 0
        assert r["tokens_per_s"] > 0 and r["params"] > 0 and r["size_bytes"] > 0
    assert rows["base"]["speed_vs_first"] == 1.0 and rows["base"]["ppl_vs_first"] == 1.0
    assert rows["base-int8"]["quantization"] == "int8_dynamic"
    assert rows["base-int8"]["size_bytes"] < rows["base"]["size_bytes"]
    assert rows["base-int8"]["ppl"] == pytest.approx(rows["base"]["ppl"], rel=0.05)
    assert rows["small"]["params"] < rows["base"]["params"]
    table = (root / "evaluate" / "table.txt").read_text()
    assert all(name in table for name in models) and "tokens/s" in table
    assert summary["output"] == str(root / "evaluate")
    assert summary["models"]["base-int8"]["ppl"] == rows["base-int8"]["ppl"]
    again = run_stage("evaluate", config(root, tokens, models))  # same config and inputs: read back, nothing recomputed
    assert again["models"] == summary["models"]


def test_missing_model_is_an_input_error_naming_the_path(ray_local, workspace):
    root, tokens, models = workspace
    missing = str(root / "nowhere" / "model")
    with pytest.raises(InputError, match="not found") as e:
        run_stage("evaluate", config(root, tokens, {"base": models["base"], "ghost": missing}, name="evaluate-missing"))
    assert missing in str(e.value) and "ghost" in str(e.value) and "\n" not in str(e.value)
    assert not (root / "evaluate-missing").exists()
