"""The packed token format (version 2) and the ingest order, without Ray: files, memory maps, ranks, positions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from raylm.artifacts import read_manifest, stage_output
from raylm.errors import ConfigError, InputError
from raylm.tokenize.bpe import train_tokenizer
from raylm.train.ingest import DataPosition, SequenceOrder, sample_checksum
from raylm.tokenize.packing import packed_split
from raylm.tokenize.shards import (
    TokenSplit, check_same_tokenizer, document_starts, read_split_numpy, read_token_meta, row_document_starts,
    write_token_data,
)
from raylm.train.topology import rank_coords

SEQ_LEN = 16
SPECIALS = ("<|endoftext|>",)


def make_tokenizer(words: list[str]):
    text = [" ".join(words)] * 30
    return train_tokenizer([text], vocab_size=300, min_frequency=2, special_tokens=SPECIALS, show_progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    tokenizer = make_tokenizer(words)
    docs = {s: [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]
            for s, n in (("train", 120), ("validation", 20))}  # fmt: skip
    ids = {s: [tokenizer.encode(d).ids for d in ds] for s, ds in docs.items()}
    path = tmp_path_factory.mktemp("shards") / "tokens"
    with stage_output(path, "tokenize", {"test": "shards"}) as out:
        splits = {s: packed_split(ids[s], 0, SEQ_LEN) for s in ids}
        out.stats = write_token_data(out.tmp, tokenizer, 0, splits, shard_rows=7).to_stats()
    return {"path": path, "ids": ids, "tokenizer": tokenizer}


def stream_of(doc_ids: list[list[int]]) -> list[int]:
    return [i for d in doc_ids for i in [*d, 0]]


def test_split_memory_maps_and_gathers_rows_in_any_order(data):
    meta = read_token_meta(data["path"])
    split = TokenSplit(meta, "train")
    stream = stream_of(data["ids"]["train"])
    assert len(split) == meta.num_sequences["train"] == (len(stream) - 1) // SEQ_LEN
    files = sorted(meta.split_dir("train").glob("part-*.npy"))
    assert len(files) == -(-len(split) // 7)
    assert np.load(files[0], mmap_mode="r").dtype == np.uint16 and meta.dtype == "uint16"  # 300 ids
    order = np.random.default_rng(0).permutation(len(split))
    rows = split.rows(order)
    for k, i in enumerate(order):
        assert rows[k].tolist() == stream[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1]
    assert read_split_numpy(meta, "train", max_rows=3).tolist() == split.head(3).tolist()
    with pytest.raises(IndexError):
        split.rows(np.array([len(split)]))


def test_document_starts_mark_every_document_in_the_rows(data):
    meta = read_token_meta(data["path"])
    docs = data["ids"]["validation"]
    starts = document_starts(meta, "validation")
    assert len(starts) == len(docs)
    assert starts.tolist() == np.cumsum([0] + [len(d) + 1 for d in docs[:-1]]).tolist()
    stream = stream_of(docs)
    rows = read_split_numpy(meta, "validation")
    n, width = len(rows), SEQ_LEN + 1
    listed = {(r, int(c)) for r in range(n) for c in row_document_starts(starts, r, SEQ_LEN)}
    expected = set()
    for p in map(int, starts):  # a start is right after a separator; rows overlap, so p = k * L shows twice
        assert p == 0 or stream[p - 1] == meta.eos_token_id
        for r in {p // SEQ_LEN, (p - 1) // SEQ_LEN}:
            if 0 <= r < n and 0 <= p - r * SEQ_LEN < width:
                expected.add((r, p - r * SEQ_LEN))
                assert rows[r][p - r * SEQ_LEN] == stream[p]
    assert listed == expected and len(listed) > len(docs) // 2


def test_a_replaced_tokenizer_or_an_old_format_is_refused(data, tmp_path):
    meta = read_token_meta(data["path"])
    other = make_tokenizer("one two three four five six seven".split())
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(InputError, match=r"other\.json: the model uses tokenizer \w+, but the token shards .* were written"):
        check_same_tokenizer(meta, tmp_path / "other.json", "the model")
    check_same_tokenizer(meta, meta.tokenizer_file, "the model")  # the same one passes

    copy = tmp_path / "copy"
    with stage_output(copy, "tokenize", {"test": "copy"}) as out:
        out.stats = read_manifest(data["path"])["stats"]
        for f in data["path"].rglob("*"):
            if f.is_file() and f.name != "manifest.json":
                (Path(out.tmp) / f.relative_to(data["path"])).parent.mkdir(parents=True, exist_ok=True)
                (Path(out.tmp) / f.relative_to(data["path"])).write_bytes(f.read_bytes())
    read_token_meta(copy)
    (copy / "tokenizer.json").write_text(other.to_str())
    with pytest.raises(InputError, match="tokenizer.json: tokenizer .* the file was replaced"):
        read_token_meta(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stats"]["format_version"] = 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="token format version 1, this raylm reads version 2"):
        read_token_meta(copy)


def test_each_rank_gets_a_disjoint_share_and_every_epoch_a_new_order():
    order = SequenceOrder(num_sequences=103, micro_batch_size=4, dp_size=3, seed=7)
    assert order.batches_per_epoch == 8  # 103 // 12; 7 sequences left over each epoch
    for epoch in (0, 1):
        shares = [order.epoch_indices(epoch, r) for r in range(3)]
        assert all(s.shape == (8, 4) for s in shares)
        flat = np.concatenate([s.reshape(-1) for s in shares])
        assert len(set(flat.tolist())) == 96 and flat.max() < 103
    assert not np.array_equal(order.epoch_indices(0, 0), order.epoch_indices(1, 0))
    again = SequenceOrder(103, 4, 3, seed=7)
    assert np.array_equal(order.epoch_indices(1, 2), again.epoch_indices(1, 2))
    plain = SequenceOrder(103, 4, 3, seed=7, shuffle=False)
    assert plain.epoch_indices(0, 1)[0].tolist() == [4, 5, 6, 7]  # micro-batch 0 of rank 1: after rank 0's
    for k in (0, 5, 8, 17):
        assert order.consumed(order.position_after(k)) == k
    assert order.position_after(17) == DataPosition(epoch=2, batch=1)
    with pytest.raises(InputError, match="11 sequences are fewer than micro_batch_size x data-parallel size = 4 x 3"):
        SequenceOrder(11, 4, 3, seed=0)


def test_pipeline_stages_share_the_data_parallel_rank():
    coords = [rank_coords(r, 8, pipeline_stages=2) for r in range(8)]
    assert [(c.stage, c.dp_rank) for c in coords] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert all(c.dp_size == 4 for c in coords) and coords[0].first_stage and coords[7].last_stage
    assert rank_coords(3, 4) == rank_coords(3, 4, 1) and rank_coords(3, 4).dp_rank == 3
    with pytest.raises(ConfigError, match="6 workers cannot form pipelines of 4 stages"):
        rank_coords(0, 6, pipeline_stages=4)


def test_sample_checksum_ignores_order_and_sees_repeats_and_epochs():
    a = np.arange(50)
    assert sample_checksum(a, 0) == sample_checksum(a[::-1], 0)
    assert (sample_checksum(a[:20], 0) + sample_checksum(a[20:], 0)) % (2**61 - 1) == sample_checksum(a, 0)
    assert sample_checksum(np.concatenate([a, [3]]), 0) != sample_checksum(a, 0)
    assert sample_checksum(a, 1) != sample_checksum(a, 0)
