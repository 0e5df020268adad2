"""SFT data: prompt/completion JSONL -> padded rows and loss masks in the token format; the loss ignores prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.config import load_config
from raylm.errors import InputError
from raylm.model.gpt import GPT, GPTConfig
from raylm.tokenize.config import SftDataConfig
from raylm.tokenize.shards import TokenSplit, check_same_tokenizer, read_token_meta
from raylm.tokenize.sft import example_row, run_sft_tokenize
from raylm.train.objectives import masked_targets

EOS = 0
ASSET = Path(__file__).resolve().parents[2] / "platform/raylm/assets/sft_demo/examples.jsonl"


def test_a_row_is_prompt_completion_eos_then_padding_and_only_the_completion_is_masked_in():
    ids, mask, truncated = example_row([5, 6, 7], [8, 9], EOS, seq_len=8, too_long="error")
    assert ids.tolist() == [5, 6, 7, 8, 9, EOS, EOS, EOS, EOS]
    assert mask.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert not truncated


def test_a_long_prompt_is_cut_from_the_left_dropped_or_refused_by_config():
    prompt, completion = list(range(10, 20)), [30, 31]
    ids, mask, truncated = example_row(prompt, completion, EOS, seq_len=6, too_long="truncate_prompt")
    assert truncated and ids.tolist() == [16, 17, 18, 19, 30, 31, EOS]  # the prompt's last 4 tokens kept
    assert mask.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert example_row(prompt, completion, EOS, seq_len=6, too_long="drop") is None
    with pytest.raises(InputError, match=r"data.jsonl:7: example of 13 tokens .* exceeds a row of tokenize.seq_len \+ 1 = 7"):
        example_row(prompt, completion, EOS, seq_len=6, too_long="error", where="data.jsonl:7")
    # a completion that leaves no room for one prompt token cannot be kept by truncating the prompt
    assert example_row([1, 2], list(range(40, 47)), EOS, seq_len=6, too_long="truncate_prompt") is None


def test_prompt_targets_contribute_nothing_to_the_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32))
    ids, mask, _ = example_row(list(range(1, 8)), [20, 21, 22], EOS, seq_len=12, too_long="error")
    rows, masks = torch.from_numpy(ids)[None].repeat(2, 1), torch.from_numpy(mask.astype(np.int64))[None].repeat(2, 1)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    masked = masked_targets(targets, masks)
    assert (masked != -100).sum() == 2 * 4  # three completion tokens and the end-of-text, per row
    assert masked[0].tolist()[:6] == [-100] * 6 and masked[0].tolist()[6:10] == [20, 21, 22, EOS]

    logits, loss = model(inputs, masked)
    # other ids at the prompt and padding positions: the same loss
    scrambled = torch.where(masks[:, 1:] == 0, torch.randint(1, 50, targets.shape), targets)
    _, loss2 = model(inputs, masked_targets(scrambled, masks))
    assert loss2 == loss
    # and the loss is the mean cross-entropy of the completion targets alone
    keep = masks[:, 1:] == 1
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    # no gradient reaches the logits at masked positions
    logits = logits.detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(logits.view(-1, 50), masked.reshape(-1), ignore_index=-100).backward()
    assert logits.grad[~keep].abs().max() == 0 and logits.grad[keep].abs().max() > 0


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory) -> Path:
    """A real byte-level BPE, saved as a model directory's tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer

    texts = [json.loads(line)["prompt"] + json.loads(line)["completion"] for line in ASSET.read_text().splitlines()]
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts * 4, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  show_progress=False)  # fmt: skip
    d = tmp_path_factory.mktemp("base")
    tokenizer.save(str(d / "tokenizer.json"))
    return d


def _sft_tokenize(cfg) -> dict:
    """The tokenize stage of `cfg` (format sft), run in this process: it needs no Ray."""
    return run_sft_tokenize(cfg.tokenize, cfg.context())


def _config(tmp_path: Path, data: Path, tokenizer: Path, *extra: str):
    return load_config(None, [
        "--prepare.input=unused", f"--run.workdir={tmp_path}", "--tokenize.format=sft", f"--tokenize.input={data}",
        f"--tokenize.tokenizer={tokenizer}", "--tokenize.seq_len=48", "--tokenize.sft.validation_fraction=0.2", *extra,
    ])  # fmt: skip


def test_the_sft_stage_writes_token_data_with_aligned_loss_masks(tmp_path, base_tokenizer):
    from tokenizers import Tokenizer

    cfg = _config(tmp_path, "package:sft_demo", base_tokenizer)  # the bundled examples
    summary = _sft_tokenize(cfg)
    records = [json.loads(line) for line in ASSET.read_text().splitlines()]
    assert summary["format"] == "sft" and summary["loss_mask"] is True
    assert sum(summary["examples"].values()) == len(records) and summary["examples"]["validation"] > 0
    assert summary["truncated_prompts"] == summary["dropped_too_long"] == summary["skipped_bad_lines"] == 0

    meta = read_token_meta(cfg.tokenize.output)
    assert meta.loss_mask and meta.seq_len == 48
    check_same_tokenizer(meta, base_tokenizer / "tokenizer.json", "the base model")  # the base's own ids
    tokenizer = Tokenizer.from_file(str(base_tokenizer / "tokenizer.json"))
    by_prompt = {r["prompt"]: r["completion"] for r in records}
    eos = tokenizer.token_to_id("<|endoftext|>")
    seen = 0
    for split in ("train", "validation"):
        data = TokenSplit(meta, split)
        rows, masks = data.rows(np.arange(len(data))), data.mask_rows(np.arange(len(data)))
        assert masks.shape == rows.shape and set(np.unique(masks)) == {0, 1}
        for row, mask in zip(rows, masks):
            start = int(np.argmax(mask))
            end = start + int(mask.sum())  # the masked-in run: completion ids and one end-of-text
            assert mask[start:end].all() and not mask[end:].any()
            prompt, completion = tokenizer.decode(row[:start].tolist()), tokenizer.decode(row[start : end - 1].tolist())
            assert by_prompt[prompt] == completion and row[end - 1] == eos and (row[end:] == eos).all()
            seen += 1
    assert seen == len(records)
    assert _sft_tokenize(cfg)["reused"] is True  # same config and input: nothing is redone


def test_bad_lines_are_refused_with_file_and_line_or_skipped_and_counted(tmp_path, base_tokenizer):
    data = tmp_path / "sft.jsonl"
    good = [json.dumps({"prompt": f"Q: what is {i}+1? A:", "completion": f" {i + 1}"}) for i in range(10)]
    data.write_text("\n".join(good[:3] + ['{"prompt": "Q: broken', *good[3:6], '{"prompt": "no completion"}', *good[6:]]) + "\n")
    with pytest.raises(InputError, match=rf"{data}:4: invalid JSON"):
        _sft_tokenize(_config(tmp_path, data, base_tokenizer))
    summary = _sft_tokenize(_config(tmp_path, data, base_tokenizer, "--tokenize.sft.on_error=skip"))
    assert summary["skipped_bad_lines"] == 2 and sum(summary["examples"].values()) == 10
    assert summary["bad_lines"][1].startswith(f"{data}:8: 'completion' must be a non-empty string, got missing")


def test_the_sft_format_needs_the_base_models_tokenizer(tmp_path):
    from raylm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tokenize: .*format sft encodes with the base model's tokenizer"):
        load_config(None, ["--prepare.input=unused", f"--run.workdir={tmp_path}", "--tokenize.format=sft"])
    assert SftDataConfig().too_long == "truncate_prompt"
