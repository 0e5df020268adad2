"""Fine-tuning in the train stage on a local Ray: continued pretraining and LoRA SFT from a pretrained debug GPT.

One base run (2 workers, a few dozen steps) feeds a continued-pretraining run and an SFT run with
LoRA on synthetic question/answer examples; each run is shared by the tests below. The answers are
words of the base's corpus ("Q: what did the cat sit on? A:" -> " the mat."): a debug-size base never
saw digits, and with its embeddings frozen under LoRA it does not learn arithmetic in a few dozen steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raylm.config import load_config
from raylm.errors import ConfigError, InputError
from raylm.model.artifact import load_model
from raylm.model.generate import generate
from raylm.model.lora import LoRALinear
from raylm.tokenize.shards import read_token_meta
from raylm.train.trainer import build_trainer
from raylm.stages import run_stage


SEQ_LEN = 32  # the make_tokens fixture's sequence length

BASE_STEPS = 60


def _overrides(root: Path, name: str, *extra: str) -> list[str]:
    return [
        "--prepare.input=unused",
        f"--run.workdir={root}",
        f"--run.name={name}",
        "--train.num_workers=2",
        "--train.micro_batch_size=4",
        "--train.log_interval_steps=1",
        "--train.eval_batches=2",
        *extra,
    ]


def _history(out: str) -> list[dict]:
    return json.loads((Path(out) / "metrics.json").read_text())["history"]


@pytest.fixture(scope="module")
def base(ray_local, make_tokens, tmp_path_factory):
    """A debug GPT pretrained on the made-up corpus: (config, summary)."""
    root = tmp_path_factory.mktemp("finetune")
    tokens = make_tokens(root / "tokens")
    cfg = load_config(None, _overrides(
        root, "base", f"--tokenize.output={tokens.path}", f"--train.output={root / 'base'}",
        "--train.model.preset=debug", "--train.zero_stage=1", f"--train.max_steps={BASE_STEPS}",
        "--train.optimizer.lr=5e-3", "--train.optimizer.warmup_steps=2", "--train.optimizer.min_lr_ratio=0.5",
        f"--train.eval_interval_steps={BASE_STEPS}",
        f"--train.checkpoint_interval_steps={BASE_STEPS}",
    ))  # fmt: skip
    return cfg, run_stage("train", cfg)


@pytest.fixture(scope="module")
def continued(base):
    """Continued pretraining from the base's train output, on the same data, a few steps at a low LR."""
    cfg, _ = base
    more = _continued_config(cfg, output=str(Path(cfg.run.workdir) / "continued"), init_from=cfg.train.output)
    return more, run_stage("train", more)


def _continued_config(base_cfg, output: str, init_from: str):
    return load_config(None, _overrides(
        Path(base_cfg.run.workdir), "continued", f"--tokenize.output={base_cfg.tokenize.output}",
        f"--train.output={output}", f"--train.init_from={init_from}", "--train.zero_stage=0", "--train.max_steps=4",
        "--train.optimizer.lr=3e-4", "--train.optimizer.warmup_steps=0", "--train.eval_interval_steps=4",
        "--train.checkpoint_interval_steps=4",
    ))  # fmt: skip


def _sft_examples() -> list[dict]:
    """Who did something decides the answer: 6 subjects x 5 verbs, one fixed object per subject."""
    who = ["the cat", "a dog", "the king", "my friend", "the old man", "a bird"]
    did = ["sat on", "looked at", "walked to", "sang about", "dreamt of"]
    what = ["the mat", "a tree", "the castle", "the sea", "a small house", "the moon"]
    return [{"prompt": f"Q: what did {w} {d}? A:", "completion": f" {a}."} for w, a in zip(who, what) for d in did]


@pytest.fixture(scope="module")
def sft(base):
    """SFT data (tokenize.format sft, the base's tokenizer), then LoRA SFT from the base model (ZeRO 2)."""
    cfg, _ = base
    root = Path(cfg.run.workdir)
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _sft_examples()))
    sft_cfg = load_config(None, _overrides(
        root, "sft", "--tokenize.format=sft", f"--tokenize.input={data}", f"--tokenize.output={root / 'sft_tokens'}",
        f"--tokenize.tokenizer={Path(cfg.train.output) / 'model'}", f"--tokenize.seq_len={SEQ_LEN}",
        f"--train.output={root / 'sft'}", f"--train.init_from={Path(cfg.train.output) / 'model'}",
        "--tokenize.sft.validation_fraction=0.2", "--train.lora={rank: 8, alpha: 16}", "--train.zero_stage=2",
        "--train.max_steps=60", "--train.micro_batch_size=8", "--train.optimizer.lr=1e-2",
        "--train.optimizer.min_lr_ratio=0.5", "--train.optimizer.weight_decay=0.0", "--train.optimizer.warmup_steps=3",
        "--train.eval_interval_steps=30", "--train.checkpoint_interval_steps=60",
    ))  # fmt: skip
    tokens = run_stage("tokenize", sft_cfg)
    return sft_cfg, tokens, run_stage("train", sft_cfg)


def test_continued_pretraining_starts_where_the_base_left_off(base, continued):
    base_cfg, base_summary = base
    cfg, summary = continued
    base_losses = [h["loss"] for h in _history(base_cfg.train.output) if "loss" in h]
    first = next(h["loss"] for h in _history(cfg.train.output) if "loss" in h)
    fresh = math.log(read_token_meta(base_cfg.tokenize.output).vocab_size)
    print(f"base: first loss {base_losses[0]:.3f}, last {base_losses[-1]:.3f}; continued: first {first:.3f}; ln(vocab) {fresh:.3f}")
    assert base_losses[-1] < fresh - 2.0  # the base learned something
    assert abs(first - base_losses[-1]) < 0.25 * base_losses[-1]
    assert first < 0.6 * base_losses[0]  # not a fresh start
    model = load_model(Path(cfg.train.output) / "model")
    assert model.meta["init_from"] == str((Path(base_cfg.train.output) / "model").resolve())
    assert model.config == load_model(Path(base_cfg.train.output) / "model").config
    assert summary["export_max_abs_diff"] < 1e-5


def test_continued_pretraining_from_a_base_model_on_s3_is_the_same_run(base, continued, s3_bucket, tmp_path):
    """train.init_from as an object-store URI (a train output there): checked on the driver, read by each worker
    from its node's copy; the same losses and weights as the run from the base on disk."""
    from raylm import storage

    base_cfg, _ = base
    _, summary = continued
    storage.copy_tree(base_cfg.train.output, f"{s3_bucket}/base")  # the whole train output, manifest included
    cfg = _continued_config(base_cfg, output=str(tmp_path / "continued"), init_from=f"{s3_bucket}/base")
    again = run_stage("train", cfg)
    assert again["loss"] == summary["loss"] and again["val_loss"] == summary["val_loss"]
    model = load_model(tmp_path / "continued" / "model")
    assert model.meta["init_from"] == f"{s3_bucket}/base/model"
    ours, theirs = load_file(str(Path(again["model"]) / "model.safetensors")), load_file(str(Path(summary["model"]) / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_the_sft_data_masks_the_prompt(sft):
    _, tokens, _ = sft
    assert tokens["format"] == "sft" and sum(tokens["examples"].values()) == len(_sft_examples())
    assert tokens["truncated_prompts"] == tokens["dropped_too_long"] == 0
    meta = read_token_meta(tokens["output"])
    assert meta.loss_mask and meta.seq_len == SEQ_LEN


def test_sft_tokenize_from_and_to_s3_writes_the_same_bytes(base, sft, s3_bucket):
    """SFT data, the tokenizer (a model directory) and the output all on the S3 server: the same files as on disk."""
    from raylm import storage

    base_cfg, _ = base
    cfg, tokens, _ = sft
    storage.copy_tree(str(Path(base_cfg.train.output) / "model"), f"{s3_bucket}/base-model")
    storage.write_bytes(f"{s3_bucket}/sft/data.jsonl", Path(cfg.tokenize.input).read_bytes())
    summary = run_stage("tokenize", load_config(None, _overrides(
        Path(base_cfg.run.workdir), "sft", "--tokenize.format=sft", f"--tokenize.input={s3_bucket}/sft",
        f"--tokenize.output={s3_bucket}/sft_tokens", f"--tokenize.tokenizer={s3_bucket}/base-model",
        f"--tokenize.seq_len={SEQ_LEN}", "--tokenize.sft.validation_fraction=0.2",
    )))  # fmt: skip
    assert summary["examples"] == tokens["examples"] and summary["output"] == f"{s3_bucket}/sft_tokens"
    local = {f.name: storage.read_bytes(str(Path(tokens["output"]) / f.name)) for f in storage.list_files(tokens["output"])}
    remote = {f.name: storage.read_bytes(f"{s3_bucket}/sft_tokens/{f.name}") for f in storage.list_files(f"{s3_bucket}/sft_tokens")}
    assert sorted(remote) == sorted(local)
    assert all(remote[name] == local[name] for name in local if name != "manifest.json")


def test_lora_sft_learns_the_completions_and_exports_a_merged_plain_model(base, sft):
    base_cfg, _ = base
    cfg, _, summary = sft
    history = _history(cfg.train.output)
    losses = [h["loss"] for h in history if "loss" in h]
    val = [h["val_loss"] for h in history if "val_loss" in h]
    print(f"SFT completion loss: first {losses[0]:.3f}, last {losses[-1]:.3f}; val {val}")
    assert losses[-1] < 0.5 * losses[0]
    assert val[-1] < val[0]

    # The export is a plain raylm GPT with the adapters merged in: it reproduces the engine's logits
    out = Path(cfg.train.output)
    model = load_model(out / "model")
    assert not any(isinstance(m, LoRALinear) for m in model.model.modules())
    assert model.meta["lora"]["merged"] and model.meta["lora"]["rank"] == 8
    assert model.meta["init_from"] == str((Path(base_cfg.train.output) / "model").resolve())
    probe = load_file(str(Path(summary["checkpoint"]) / "export_probe.safetensors"))
    with torch.no_grad():
        logits, _ = model.model(probe["input_ids"])
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-4, atol=1e-4)
    assert summary["export_max_abs_diff"] < 1e-4
    # Only the adapted layers changed: embeddings and norms are the base's, bit for bit
    base_weights = load_file(str(Path(base_cfg.train.output) / "model" / "model.safetensors"))
    tuned = load_file(str(out / "model" / "model.safetensors"))
    assert torch.equal(tuned["wte.weight"], base_weights["wte.weight"])
    assert torch.equal(tuned["blocks.0.ln_1.weight"], base_weights["blocks.0.ln_1.weight"])
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], base_weights["blocks.0.attn.qkv.weight"])

    # Greedy generation from training prompts gives their completions
    tok = model.tokenizer
    examples = _sft_examples()
    right = 0
    for ex in examples:
        ids = tok.encode(ex["prompt"], add_special_tokens=False).ids
        result = generate(model.model, ids, max_new_tokens=8, temperature=0, eos_token_id=model.eos_token_id)
        right += tok.decode(result.token_ids) == ex["completion"]
    print(f"greedy generation: {right} of {len(examples)} completions exact")
    assert right >= len(examples) * 2 // 3


def test_bad_init_from_is_refused_before_any_worker_starts(base, tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    from raylm.artifacts import stage_output
    from raylm.tokenize.packing import packed_split
    from raylm.tokenize.shards import write_token_data

    cfg, _ = base
    base_model = Path(cfg.train.output) / "model"
    # token data from another tokenizer
    other = ByteLevelBPETokenizer()
    other.train_from_iterator(["a completely different corpus of words"] * 50, vocab_size=280, min_frequency=2,
                              special_tokens=["<|endoftext|>"], show_progress=False)  # fmt: skip
    eos = other.token_to_id("<|endoftext|>")
    docs = [other.encode("a completely different corpus of words " * 8).ids for _ in range(40)]
    with stage_output(tmp_path / "other", "tokenize", {"test": "other"}) as out:
        splits = {s: packed_split(docs, eos, SEQ_LEN) for s in ("train", "validation")}
        out.stats = write_token_data(out.tmp, other, eos, splits).to_stats()
    wrong = cfg.train.model_copy(update={"data": str(tmp_path / "other"), "init_from": str(base_model)})
    with pytest.raises(InputError, match=r"train.init_from model .* uses tokenizer \w+, but the token shards"):
        build_trainer(wrong, run_name="wrong", storage_path=str(tmp_path / "ray"))
    # a train.model that asks for another shape than the base's
    wider = load_config(None, [
        "--prepare.input=unused", f"--run.workdir={tmp_path}", f"--tokenize.output={cfg.tokenize.output}",
        f"--train.init_from={base_model}", "--train.model.d_model=128",
    ]).train  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.model: d_model=128 \(base: 64\) conflicts with train.init_from"):
        build_trainer(wider, run_name="wider", storage_path=str(tmp_path / "ray"))
    with pytest.raises(InputError, match=r"neither an exported raylm model"):
        build_trainer(wider.model_copy(update={"init_from": str(tmp_path)}), run_name="x", storage_path=str(tmp_path / "ray"))
