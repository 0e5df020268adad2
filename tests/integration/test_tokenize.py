"""The tokenize stage end to end on a tiny synthetic prepare output, with a real local Ray."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.artifacts import read_manifest, stage_output
from raylm.config import load_config
from raylm.errors import ConfigError, InputError
from raylm.tokenize.bpe import load_tokenizer
from raylm.tokenize.shards import SPLITS, document_starts, read_split_numpy, read_token_meta
from raylm.stages import run_stage

SEQ_LEN = 32
SHARD_ROWS = 50
WORDS = "the of and to a in that is was he for it with as his on be at by had not are but from or have an they which".split()
WORDS += ["Ünïcödé", "naïve", "café", "🦊", "日本語", "x\ty", "<|endoftext|>"]  # the last one is literal text in a document


def synthetic_docs(n: int, rng: random.Random) -> list[str]:
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(rng.randint(1, 4))]
        docs.append("\n".join(lines).capitalize() + ".")
    return docs


def write_prepared(root: Path, splits: dict[str, list[list[str]]]) -> Path:
    """A finished prepare output: <root>/{train,validation}/part-N.parquet (id, text) and its manifest."""
    with stage_output(root, "prepare", {"synthetic": True}) as out:
        for split, files in splits.items():
            (Path(out.tmp) / split).mkdir()
            for i, docs in enumerate(files):
                ids = [f"{split}-{i}-{j}" for j in range(len(docs))]
                table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(docs, pa.string())})
                pq.write_table(table, Path(out.tmp) / split / f"part-{i:05d}.parquet")
        out.stats = {"documents": {s: sum(map(len, f)) for s, f in splits.items()}}
    return root


def make_config(workdir: Path, prepared: Path, output: Path, *overrides: str):
    return load_config(None, [
        f"run.workdir={workdir}", "prepare.input=unused",
        f"tokenize.input={prepared}", f"tokenize.output={output}",
        "tokenize.vocab_size=400", f"tokenize.seq_len={SEQ_LEN}", f"tokenize.shard_rows={SHARD_ROWS}",
        "tokenize.batch_size=64", "tokenize.encode_actors=2", "tokenize.tokenizer_sample_docs=200",
        *overrides,
    ])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("tokenize")
    train = [synthetic_docs(120, rng), [], synthetic_docs(150, rng), synthetic_docs(30, rng)]  # one empty shard
    validation = [synthetic_docs(40, rng)]
    prepared = write_prepared(root / "prepared", {"train": train, "validation": validation})
    docs = {"train": [d for f in train for d in f], "validation": validation[0]}
    return {"root": root, "prepared": prepared, "docs": docs}


@pytest.fixture(scope="module")
def tokenized(ray_local, corpus) -> dict:
    cfg = make_config(corpus["root"], corpus["prepared"], corpus["root"] / "tokens")
    summary = run_stage("tokenize", cfg)
    return {"cfg": cfg, "summary": summary, "path": Path(summary["output"])}


def test_tokenizer_file_loads_and_round_trips_the_documents(tokenized, corpus):
    tokenizer = load_tokenizer(tokenized["path"] / "tokenizer.json")
    meta = read_token_meta(tokenized["path"])
    assert tokenizer.get_vocab_size() == meta.vocab_size <= 400
    assert tokenizer.token_to_id("<|endoftext|>") == meta.eos_token_id == 0
    docs = corpus["docs"]["validation"] + ["unseen: Ωμέγα ∑ 中文 \x00 trailing  "]
    for doc in docs:
        if "<|endoftext|>" not in doc:
            assert tokenizer.decode(tokenizer.encode(doc).ids) == doc
    tokenizer.encode_special_tokens = True  # as the stage encodes documents: special-token text is just text
    for doc in docs:
        assert tokenizer.decode(tokenizer.encode(doc).ids) == doc


def test_shards_hold_every_document_and_separator_in_order(tokenized, corpus):
    meta = read_token_meta(tokenized["path"])
    stats = read_manifest(tokenized["path"])["stats"]
    tokenizer = load_tokenizer(tokenized["path"])
    tokenizer.encode_special_tokens = True  # documents' literal "<|endoftext|>" is text, as the stage encodes it
    assert meta.seq_len == SEQ_LEN and meta.dtype == "uint16" and meta.format_version == 2
    for split in SPLITS:
        docs = corpus["docs"][split]
        doc_ids = [tokenizer.encode(d, add_special_tokens=False).ids + [meta.eos_token_id] for d in docs]
        expected = [i for ids in doc_ids for i in ids]
        n = meta.num_sequences[split]
        assert stats["documents"][split] == len(docs)
        assert stats["tokens"][split] == len(expected)
        assert n == (len(expected) - 1) // SEQ_LEN > 0
        assert stats["dropped_tokens"][split] == len(expected) - (n * SEQ_LEN + 1) < SEQ_LEN
        rows = read_split_numpy(meta, split)
        assert rows.shape == (n, SEQ_LEN + 1)
        np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])  # consecutive rows overlap by one token
        stream = np.concatenate([rows[0], rows[1:, 1:].reshape(-1)])
        assert stream.tolist() == expected[: len(stream)]
        files = sorted(meta.split_dir(split).glob("*.npy"))
        assert len(files) == stats["shards"][split] == -(-n // SHARD_ROWS)
        assert np.load(files[0], mmap_mode="r").shape == (SHARD_ROWS, SEQ_LEN + 1)
        # no token lost: the rows plus the dropped tail are every document's tokens and separator
        assert n * SEQ_LEN + 1 + stats["dropped_tokens"][split] == sum(map(len, doc_ids))
        assert document_starts(meta, split).tolist() == np.cumsum([0] + [len(i) for i in doc_ids[:-1]]).tolist()
    assert stats["tokenizer_documents"] == 200 and stats["tokenizer"] == "trained"
    assert stats["tokens_per_s"] > 0


def test_ray_data_reads_the_shards_as_they_are(tokenized):
    import ray

    meta = read_token_meta(tokenized["path"])
    ds = ray.data.read_numpy(str(meta.split_dir("train")))
    assert ds.count() == meta.num_sequences["train"]
    first = ds.take_batch(3, batch_format="numpy")["data"]
    assert first.shape == (3, SEQ_LEN + 1) and first.tolist() == read_split_numpy(meta, "train", 3).tolist()


def test_rerun_with_the_same_config_is_a_noop(tokenized):
    before = {f: f.stat().st_mtime_ns for f in tokenized["path"].rglob("*")}
    again = run_stage("tokenize", tokenized["cfg"])
    assert again["reused"] is True and tokenized["summary"]["reused"] is False
    assert again["num_sequences"] == tokenized["summary"]["num_sequences"]
    assert {f: f.stat().st_mtime_ns for f in tokenized["path"].rglob("*")} == before


def test_outputs_are_byte_identical_across_runs_and_actor_counts(tokenized, corpus):
    other = corpus["root"] / "tokens-again"
    cfg = make_config(corpus["root"], corpus["prepared"], other, "tokenize.encode_actors=1", "tokenize.batch_size=50")
    run_stage("tokenize", cfg)
    first = {f.relative_to(tokenized["path"]): f.read_bytes() for f in tokenized["path"].rglob("*") if f.is_file()}
    second = {f.relative_to(other): f.read_bytes() for f in other.rglob("*") if f.is_file()}
    assert first.keys() == second.keys()
    for name in first:
        if name.name != "manifest.json":  # holds timings
            assert first[name] == second[name], name
    stats = [json.loads(first[Path("manifest.json")])["stats"], json.loads(second[Path("manifest.json")])["stats"]]
    assert [s["num_sequences"] for s in stats][0] == [s["num_sequences"] for s in stats][1]


def test_bad_inputs_and_configs_are_one_line_errors(corpus, tmp_path):
    with pytest.raises(ConfigError, match="tokenize.*vocab_size 260 is too small"):
        make_config(tmp_path, corpus["prepared"], tmp_path / "t", "tokenize.vocab_size=260",
                    "tokenize.special_tokens=[a, b, c, d, e]")
    cfg = make_config(tmp_path, corpus["prepared"], tmp_path / "t")
    small = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"vocab_size": 256})})
    with pytest.raises(ConfigError, match="vocab_size: 256 is too small"):
        run_stage("tokenize", small)
    with pytest.raises(InputError, match="not found"):
        run_stage("tokenize", make_config(tmp_path, tmp_path / "nothing", tmp_path / "t"))
    empty = write_prepared(tmp_path / "empty", {"train": [[]], "validation": [["a document"]]})
    with pytest.raises(InputError, match="train split has no documents"):
        run_stage("tokenize", make_config(tmp_path, empty, tmp_path / "t"))
    no_validation = write_prepared(tmp_path / "noval", {"train": [["a document"]], "validation": [[]]})
    with pytest.raises(InputError, match="validation split has no documents .*validation_fraction"):
        run_stage("tokenize", make_config(tmp_path, no_validation, tmp_path / "t"))
    with pytest.raises(InputError, match=r"validation split's 40 documents hold \d+ tokens, too few for one sequence"):
        run_stage("tokenize", make_config(tmp_path, corpus["prepared"], tmp_path / "t", "tokenize.seq_len=4096"))
    with pytest.raises(InputError, match="no tokenizer in this directory"):
        run_stage("tokenize", make_config(tmp_path, corpus["prepared"], tmp_path / "t", f"tokenize.tokenizer={tmp_path}"))
    numbers = write_prepared(tmp_path / "numbers", {"train": [["a document"]]})
    pq.write_table(pa.table({"id": ["x"], "text": [3]}), numbers / "train" / "part-00001.parquet")
    with pytest.raises(InputError, match=r"part-00001.parquet: column `text` holds int64, expected strings"):
        run_stage("tokenize", make_config(tmp_path, numbers, tmp_path / "t"))
    assert not (tmp_path / "t").exists()


def test_long_documents_in_pieces_give_the_same_shards(tokenized, corpus):
    """Cutting documents into pieces of at most 64 characters spreads them over actors and changes no byte."""
    other = corpus["root"] / "tokens-pieces"
    cfg = make_config(corpus["root"], corpus["prepared"], other, "tokenize.max_piece_chars=64")
    stats = run_stage("tokenize", cfg)
    assert stats["pieces"]["train"] > stats["documents"]["train"] == len(corpus["docs"]["train"])
    for f in tokenized["path"].rglob("*.npy"):
        assert (other / f.relative_to(tokenized["path"])).read_bytes() == f.read_bytes(), f


def test_gpt2_tokenizer_files_encode_like_tokenizers_itself(corpus, gpt2_files, demo_texts):
    """tokenize.tokenizer = GPT-2's encoder.json + vocab.bpe: the shards hold tokenizers' own ids, token for token."""
    from tokenizers import ByteLevelBPETokenizer

    root = corpus["root"]
    docs = demo_texts[:60]
    prepared = write_prepared(root / "prepared-gpt2", {"train": [docs[:50]], "validation": [docs[50:]]})
    cfg = make_config(root, prepared, root / "tokens-gpt2", f"tokenize.tokenizer={gpt2_files}", "tokenize.seq_len=128")
    stats = run_stage("tokenize", cfg)
    meta = read_token_meta(stats["output"])
    assert meta.vocab_size == 50257 and meta.eos_token_id == 50256 and meta.dtype == "uint16"
    assert stats["tokenizer"] == str(gpt2_files) and stats["tokenizer_documents"] == 0
    reference = ByteLevelBPETokenizer(str(gpt2_files / "encoder.json"), str(gpt2_files / "vocab.bpe"))
    expected = [i for ids in reference.encode_batch(docs[:50]) for i in ids.ids + [50256]]
    rows = read_split_numpy(meta, "train")
    stream = np.concatenate([rows[0], rows[1:, 1:].reshape(-1)])
    assert stream.tolist() == expected[: len(stream)] and len(expected) - len(stream) == stats["dropped_tokens"]["train"]


def test_tokenize_from_and_to_s3_writes_the_same_bytes(ray_local, corpus, tokenized, s3_bucket, tmp_path, monkeypatch):
    """The prepared data on the S3 server, the tokens written there: every file the same bytes as on disk, and a
    reader gets the shards through one copy in its node's cache."""
    from raylm import storage

    prepared = f"{s3_bucket}/run/prepared"
    storage.copy_tree(str(corpus["prepared"]), prepared)
    output = f"{s3_bucket}/run/tokens"
    cfg = make_config(tmp_path / "unused", prepared, output)  # type: ignore[arg-type]
    summary = run_stage("tokenize", cfg)
    assert summary["output"] == output and not summary["reused"]
    local = tokenized["path"]
    names = [f.name for f in storage.list_files(output)]
    assert names == [f.name for f in storage.list_files(str(local))]
    for name in names:
        if name != "manifest.json":  # its paths and timings differ
            assert storage.read_bytes(storage.join(output, name)) == (local / name).read_bytes(), name
    assert not (tmp_path / "unused").exists()  # nothing of the run on the local disk

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    meta = read_token_meta(output)
    assert meta.location == output and str(meta.path).startswith(str(tmp_path / "cache"))
    copies = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))
    assert len(copies) == 1 and read_token_meta(output).path == meta.path  # downloaded once, then reused
    for split in SPLITS:
        assert np.array_equal(read_split_numpy(meta, split), read_split_numpy(read_token_meta(local), split))
    assert run_stage("tokenize", cfg)["reused"]


@pytest.mark.parametrize("shard_rows, seq_len", [(1, 4), (3, 7), (50, 16)])
def test_shard_tasks_write_what_one_sequential_packer_writes(ray_local, tmp_path, shard_rows, seq_len):
    """Random encoded blocks (pieces of 1-30 ids, documents ending anywhere): the shards and document starts that
    Ray tasks write from the driver's layout are the arrays the sequential packer cuts, shard for shard."""
    import ray

    from raylm.tokenize.encode import IDS_COLUMN, LAST_COLUMN, block_document_ends, block_stream
    from raylm.tokenize.packing import RowBatcher, SequencePacker
    from raylm.tokenize.shard_tasks import SplitShards, _block_layout

    rng = np.random.default_rng(shard_rows)
    blocks = []
    for _ in range(40):
        n = int(rng.integers(1, 6))
        pieces = [rng.integers(0, 500, size=int(rng.integers(1, 31))).tolist() for _ in range(n)]
        blocks.append(pa.table({IDS_COLUMN: pa.array(pieces, type=pa.list_(pa.uint16())), LAST_COLUMN: rng.random(n) < 0.6}))
    blocks.append(pa.table({IDS_COLUMN: pa.array([[1, 2, 3]], type=pa.list_(pa.uint16())), LAST_COLUMN: [True]}))
    num_docs = sum(int(np.count_nonzero(b.column(LAST_COLUMN))) for b in blocks)

    packer, batcher = SequencePacker(seq_len, np.uint16), RowBatcher(shard_rows, seq_len + 1, np.uint16)
    expected, starts, position = [], [0], 0
    for b in blocks:
        starts += [position + int(end) for end in block_document_ends(b)]
        position += len(block_stream(b))
        expected += list(batcher.add(packer.add(block_stream(b))))
    expected += list(batcher.flush())

    shards = SplitShards(str(tmp_path), "train", num_docs, seq_len, shard_rows, np.uint16)
    for b in blocks:
        lengths, last = _block_layout(b)
        shards.add(ray.put(b), lengths, last, 0, b.num_rows)
    counts = shards.close()
    files = sorted((tmp_path / "train").glob("part-*.npy"))
    assert counts["shards"] == len(files) == len(expected) > 1
    for path, rows in zip(files, expected):
        written = np.load(path)
        assert written.dtype == np.uint16 and np.array_equal(written, rows), path.name
    assert counts["sequences"] == packer.rows_out and counts["dropped_tokens"] == packer.dropped_tokens
    assert counts["tokens"] == position and counts["documents"] == num_docs
    assert np.array_equal(np.load(tmp_path / "doc_starts" / "train.npy"), starts[:num_docs])
